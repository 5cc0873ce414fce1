# Self-contained on purpose: pth_to_hf copies this file into projector/ so that the folder loads with
# AutoModel.from_pretrained with remote code allowed, as xtuner's does. Import nothing from llavaflow.
#
# xtuner's keys (visual_hidden_size, llm_hidden_size, depth, hidden_act, bias) are kept as they are, so
# xtuner's own code reads our folders; the two more describe where the projector's input comes from,
# so every export, chat and evaluation read them from the model instead of assuming xtuner's defaults:
#   visual_select_layer:   hidden_states index of the vision tower (xtuner's LLaVAModel argument)
#   visual_select_feature: "patch" (CLS dropped, as xtuner and LLaVA-1.5) -- LLaVA's mm_vision_select_feature
from transformers import PretrainedConfig


class ProjectorConfig(PretrainedConfig):
    model_type = "projector"
    _auto_class = "AutoConfig"

    def __init__(
        self,
        visual_hidden_size=4096,
        llm_hidden_size=4096,
        depth=2,
        hidden_act="gelu",
        bias=True,
        visual_select_layer=-2,
        visual_select_feature="patch",
        **kwargs,
    ):
        self.visual_hidden_size = visual_hidden_size
        self.llm_hidden_size = llm_hidden_size
        self.depth = depth
        self.hidden_act = hidden_act
        self.bias = bias
        self.visual_select_layer = visual_select_layer
        self.visual_select_feature = visual_select_feature
        super().__init__(**kwargs)
