"""The engine on CUDA: graph / compiled decode against eager, Triton pieces against torch,
bf16 against transformers. Skips without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_support import PROMPT, hf_greedy, random_prompts, write_tiny_model

from slimstack.engine.cuda_graph import GraphRunner, decode_runner
from slimstack.engine.loader import load

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def stories_fp32(stories260k_dir: Path):
    return load(stories260k_dir, device="cuda", dtype=torch.float32)


def test_graph_decode_matches_eager_and_cpu(stories_fp32, stories260k_dir: Path) -> None:
    prompts = [PROMPT, "Tom had a", "The sun"]
    graph = stories_fp32.generate(prompts, max_new_tokens=40, mode="graph")
    eager = stories_fp32.generate(prompts, max_new_tokens=40, mode="eager")
    cpu = load(stories260k_dir, device="cpu").generate(prompts, max_new_tokens=40)
    assert graph.token_ids == eager.token_ids == cpu.token_ids
    assert isinstance(stories_fp32._decoders["graph"], GraphRunner)


def test_graph_is_reused_for_the_same_cache_and_replays_identically(stories_fp32) -> None:
    first = stories_fp32.generate(PROMPT, max_new_tokens=30, mode="graph")
    runner = decode_runner(stories_fp32, "graph")
    second = stories_fp32.generate(PROMPT, max_new_tokens=30, mode="graph")
    assert decode_runner(stories_fp32, "graph") is runner
    assert first.tokens == second.tokens


def test_graph_logits_equal_eager_logits_bitwise(stories_fp32) -> None:
    model = stories_fp32
    tokens = torch.tensor([model.tokenizer(PROMPT)["input_ids"]], device="cuda")
    model.setup_cache(1, 128)
    graph = decode_runner(model, "graph")
    model.prefill(tokens, [0])
    graph.slot.fill_(tokens.shape[1])
    graph.tokens.fill_(42)
    replayed = graph.step().clone()
    eager = model.decode(graph.tokens, graph.slot)
    assert torch.equal(replayed, eager)


def test_seeded_sampling_repeats_on_gpu(stories_fp32) -> None:
    kwargs = dict(max_new_tokens=40, temperature=0.8, top_k=50, top_p=0.9, mode="graph")
    a = stories_fp32.generate([PROMPT, "Hi"], seed=7, **kwargs)
    b = stories_fp32.generate([PROMPT, "Hi"], seed=7, **kwargs)
    assert a.token_ids == b.token_ids


def test_triton_kernels_match_torch_kernels(stories260k_dir: Path) -> None:
    triton_model = load(stories260k_dir, device="cuda", dtype=torch.float32, kernels="triton")
    torch_model = load(stories260k_dir, device="cuda", dtype=torch.float32, kernels="torch")
    assert triton_model.kernels.name == "triton"
    ids = torch.tensor([triton_model.tokenizer(PROMPT)["input_ids"]] * 2, device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    assert torch.allclose(triton_model.logits(ids, mask), torch_model.logits(ids, mask), atol=1e-4)
    assert (
        triton_model.generate(PROMPT, max_new_tokens=40).tokens
        == torch_model.generate(PROMPT, max_new_tokens=40).tokens
    )


def test_compiled_decode_matches_eager(stories_fp32) -> None:
    compiled = stories_fp32.generate(PROMPT, max_new_tokens=20, mode="compile")
    eager = stories_fp32.generate(PROMPT, max_new_tokens=20, mode="eager")
    assert compiled.tokens == eager.tokens


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_bf16_graph_decode_tracks_transformers(model_type: str, tmp_path: Path) -> None:
    """bf16 rounding differs between implementations, so compare the first tokens and the
    prefill logits loosely; graph and eager must still agree exactly."""
    from transformers import AutoModelForCausalLM

    folder = write_tiny_model(tmp_path / model_type, model_type)
    engine = load(folder, device="cuda", dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.bfloat16, local_files_only=True
    ).cuda()
    prompts = random_prompts(engine.config.vocab_size, [13, 6], seed=3)
    ours = engine.generate(prompts, max_new_tokens=16, mode="graph")
    assert ours.token_ids == engine.generate(prompts, max_new_tokens=16, mode="eager").token_ids
    theirs = hf_greedy(reference, prompts, 16)
    assert [row[:4] for row in ours.token_ids] == [row[:4] for row in theirs]
    ids = torch.tensor([prompts[0]], device="cuda")
    with torch.no_grad():
        ref_logits = reference(ids).logits.float()
    assert torch.allclose(engine.logits(ids), ref_logits, atol=0.15, rtol=0.05)


def test_decode_has_no_host_sync(stories_fp32) -> None:
    """A captured step replays with the CPU running ahead: queue many steps, then sync."""
    model = stories_fp32
    model.setup_cache(1, 256)
    runner = decode_runner(model, "graph")
    model.prefill(torch.tensor([[1, 2, 3]], device="cuda"), [0])
    runner.slot.fill_(3)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(50):
            logits = runner.step()
            runner.tokens.copy_(logits.argmax(-1, keepdim=True))
            runner.slot.add_(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(runner.slot.item()) == 53


@pytest.fixture(scope="module")
def pruned_folders(stories260k_dir: Path, tmp_path_factory) -> dict[str, Path]:
    from slimstack.prune.driver import prune

    root = tmp_path_factory.mktemp("pruned")
    folders = {}
    for fmt, sparsity in (("sparse24", "2:4"), ("bitmap", "0.5")):
        folders[fmt] = root / fmt
        prune(stories260k_dir, folders[fmt], method="magnitude", sparsity=sparsity, progress=False)
    return folders


@pytest.mark.parametrize("fmt", ["sparse24", "bitmap"])
def test_packed_bf16_graph_decode_matches_eager(pruned_folders: dict[str, Path], fmt: str) -> None:
    """The sparse kernels inside a captured graph: the same tokens as launched one by one."""
    model = load(pruned_folders[fmt], device="cuda", dtype=torch.bfloat16)
    assert model.info().formats == {fmt: 20}
    prompts = [PROMPT, "Tom had a", "The sun"]
    graph = model.generate(prompts, max_new_tokens=30, mode="graph")
    eager = model.generate(prompts, max_new_tokens=30, mode="eager")
    assert isinstance(model._decoders["graph"], GraphRunner)
    assert graph.token_ids == eager.token_ids


def test_generate_host_syncs_do_not_grow_with_tokens(pruned_folders: dict[str, Path]) -> None:
    """The whole generate() loop (sampling, token copies, the pinned reader, stop strings):
    a host sync per token would make the count grow with max_new_tokens."""
    import warnings

    model = load(pruned_folders["sparse24"], device="cuda", dtype=torch.bfloat16)
    kwargs = dict(temperature=0.8, top_p=0.9, seed=0, stop=["xyzzy"], mode="graph")

    def syncs(max_new_tokens: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model.generate([PROMPT, "Hi"], max_new_tokens=max_new_tokens, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(8)  # captures the graph for this cache size
    assert syncs(80) == syncs(10)
