"""The tool around the model: everything that talks to files, users and devices.

The paper is in the files beside this folder (repmixer.py, qwen2.py, fastvlm.py, train.py, infer.py);
these files serve them, each named by what it handles:

    loading.py     model folders in either published layout, Hub names, config.json and its limits,
                   tokenizer files, memory checks: a folder in, a FastVLM out
    checkpoint.py  safetensors files in and out, every tensor accounted for
    tokenizer.py   Qwen2's byte-level BPE
    chat.py        a conversation about one image file: its checks, its KV cache across turns, timing
    batch.py       infer.py --batch: JSON lines in, answers out, resumable and locked
    serving.py     serve.py's model side: OpenAI chat requests checked, conversations kept with their
                   KV caches, answers with stop strings
    options.py     the command lines of infer.py and train.py, each bound beside its option
    llava_data.py  LLaVA's conversations and images into training batches
    training.py    a training run's folder and processes: initialisation, resume, atomic saves,
                   DDP/FSDP, evaluation, plots
    speedups.py    every speed-up, applied to a loaded model in one step

docs/architecture.md draws who imports whom. Nothing in repmixer.py, qwen2.py or fastvlm.py imports
from here.
"""
