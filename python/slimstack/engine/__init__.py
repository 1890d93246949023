"""slimstack's inference engine: a decoder stack for llama / mistral / qwen2 checkpoints with
packed sparse linears, a static KV cache, CUDA-graph decode and `generate()`.

    model = slimstack.load("pruned-folder", device="cuda", dtype=torch.bfloat16)
    print(model.info())
    print(model.generate("Once upon a time", max_new_tokens=64).text)
"""
