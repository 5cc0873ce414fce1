# Conversions after training, in the order of xtuner's LLaVA-Phi-3 README:
# pth -> xtuner folder -> Llama LLM -> official LLaVA / HF LLaVA. Each streams tensors and publishes atomically.


rule pth_to_hf:
    input:
        ckpt="results/finetune/final.pth",
        **base_model_inputs(),
    output:
        directory("results/iter_xtuner"),
    log:
        "results/logs/pth_to_hf.log",
    benchmark:
        "results/benchmarks/pth_to_hf.tsv"
    params:
        llm=config["model"]["llm"],
        visual_encoder=config["model"]["visual_encoder"],
        select_layer=config["model"]["visual_select_layer"],
        dtype=config["convert"]["dtype"],
        code=CONVERT_CODE,
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
    conda:
        "../envs/llavaflow.yaml"
    shell:
        "llavaflow convert pth_to_hf {input.ckpt} {output} --llm {params.llm} --visual-encoder {params.visual_encoder}"
        " --visual-select-layer {params.select_layer} --dtype {params.dtype} > {log} 2>&1"


rule phi_to_llama:
    input:
        "results/iter_xtuner",
    output:
        directory("results/iter_xtuner_llama_llm"),
    log:
        "results/logs/phi_to_llama.log",
    benchmark:
        "results/benchmarks/phi_to_llama.tsv"
    params:
        code=CONVERT_CODE,
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/llavaflow.yaml"
    shell:
        "llavaflow convert phi_to_llama --phi_path {input} --save_path {output} > {log} 2>&1"


rule export_llava:
    input:
        llm="results/iter_xtuner_llama_llm",
        xtuner="results/iter_xtuner",
    output:
        directory("results/iter_llava"),
    log:
        "results/logs/export_llava.log",
    benchmark:
        "results/benchmarks/export_llava.tsv"
    params:
        dtype=config["convert"]["dtype"],
        tower=mm_vision_tower(),
        code=CONVERT_CODE,
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/llavaflow.yaml"
    shell:
        "llavaflow convert to_llava --text_model_id {input.llm} --vision_model_id {input.xtuner}/visual_encoder"
        " --projector_weight {input.xtuner}/projector/model.safetensors --save_path {output}"
        " --mm_vision_tower {params.tower} --dtype {params.dtype} > {log} 2>&1"


rule export_hf:
    input:
        llm="results/iter_xtuner_llama_llm",
        xtuner="results/iter_xtuner",
    output:
        directory("results/iter_hf"),
    log:
        "results/logs/export_hf.log",
    benchmark:
        "results/benchmarks/export_hf.tsv"
    params:
        dtype=config["convert"]["dtype"],
        code=CONVERT_CODE,
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/llavaflow.yaml"
    shell:
        "llavaflow convert to_hf --text_model_id {input.llm} --vision_model_id {input.xtuner}/visual_encoder"
        " --projector_weight {input.xtuner}/projector/model.safetensors --save_path {output}"
        " --dtype {params.dtype} > {log} 2>&1"


rule export_gguf:
    input:
        "results/iter_xtuner",
    output:
        directory("results/iter_gguf"),
    log:
        "results/logs/export_gguf.log",
    benchmark:
        "results/benchmarks/export_gguf.tsv"
    params:
        dtype=config["gguf"]["dtype"],
        quantize=" ".join(config["gguf"]["quantize"]),
        code=CONVERT_CODE,
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
    conda:
        "../envs/llavaflow.yaml"
    shell:
        "llavaflow convert to_gguf {input} {output} --dtype {params.dtype} --quantize {params.quantize}"
        " > {log} 2>&1"
