# Self-contained on purpose (see configuration_projector.py): copied into exported projector/ folders.
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from .configuration_projector import ProjectorConfig


class ProjectorModel(PreTrainedModel):
    """Linear -> act -> Linear ... (xtuner ProjectorModel); keys model.0, model.2, ..."""

    _auto_class = "AutoModel"
    config_class = ProjectorConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__(config)
        self.gradient_checkpointing = False
        modules = [nn.Linear(config.visual_hidden_size, config.llm_hidden_size, bias=config.bias)]
        for _ in range(1, config.depth):
            modules.append(ACT2FN[config.hidden_act])
            modules.append(nn.Linear(config.llm_hidden_size, config.llm_hidden_size, bias=config.bias))
        self.model = nn.Sequential(*modules)
        self.post_init()

    def enable_input_require_grads(self):
        def make_inputs_require_grad(module, input, output):
            output.requires_grad_(True)

        self.model.register_forward_hook(make_inputs_require_grad)

    def _init_weights(self, module):
        # Keep nn.Linear's default init, as xtuner's projector (which has no post_init) does.
        pass

    def forward(self, x):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(self.model.__call__, x)
        return self.model(x)
