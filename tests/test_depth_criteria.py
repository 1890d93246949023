"""Depth criteria on cases with known answers, and against transformers on stories260K."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slimstack.calibration import load_calibration
from slimstack.checkpoint import Checkpoint
from slimstack.checkpoint_writer import CheckpointWriter
from slimstack.depth.analyze import score_layers
from slimstack.depth.angular import AngularDistance, angle, unit
from slimstack.depth.block_influence import BlockInfluence
from slimstack.depth.passes import forward_pass
from slimstack.depth.perplexity import LayerRemovalPerplexity
from slimstack.depth.selection import agreement, canonical_criterion, layers_to_drop
from slimstack.depth.snr import mp_singular_quantiles, snr_scores, weight_snr
from slimstack.depth.taylor import plus_keep, taylor_scores

IDENTITY_LAYER = 2


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, shared_dir: Path) -> Path:
    """A slice of wikitext-2 valid: enough windows, and quick to tokenize."""
    text = (shared_dir / "data" / "wikitext-2" / "valid.txt").read_text()[:30000]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory, stories260k_dir: Path) -> Path:
    """stories260K with layer 2's o_proj and down_proj zeroed: both residual branches add
    exactly 0, so the layer is the identity."""
    out = tmp_path_factory.mktemp("identity") / "model"
    zeroed = {
        f"model.layers.{IDENTITY_LAYER}.self_attn.o_proj.weight",
        f"model.layers.{IDENTITY_LAYER}.mlp.down_proj.weight",
    }
    with Checkpoint.open(stories260k_dir) as src, CheckpointWriter(out) as writer:
        for name in src.tensor_names():
            tensor = src.get_tensor(name)
            writer.add(name, torch.zeros_like(tensor) if name in zeroed else tensor)
        writer.finish(src.config, None, tokenizer_from=stories260k_dir)
    return out


@pytest.fixture(scope="module")
def identity_scores(identity_model: Path, calib_file: Path) -> dict:
    calib = load_calibration(identity_model, calib_file, nsamples=4, seqlen=32, seed=1)
    with Checkpoint.open(identity_model) as ckpt:
        results, _ = score_layers(
            ckpt,
            calib.input_ids,
            ["angular", "block_influence", "taylor", "perplexity", "snr"],
            progress=False,
        )
    return results


# ------------------------------------------------------------------------------ geometry
def test_angle_is_exact_for_parallel_and_known_for_others():
    gen = torch.Generator().manual_seed(0)
    u = unit(torch.randn(50, 64, generator=gen))
    assert torch.equal(angle(u, u), torch.zeros(50))
    orthogonal = unit(torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]]))
    other = unit(torch.tensor([[0.0, 2.0], [-1.0, 0.0], [-3.0, -4.0]]))
    expected = torch.tensor([math.pi / 2, math.pi / 2, math.pi])
    torch.testing.assert_close(angle(orthogonal, other), expected, rtol=0, atol=1e-6)
    v = unit(torch.randn(50, 64, generator=gen))
    reference = torch.arccos((u.double() * v.double()).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(angle(u, v).double(), reference, rtol=0, atol=1e-5)


def _rotations(degrees: list[float]) -> list[torch.Tensor]:
    """Hidden states [1 window, 1 token, 2] at the given angles (layer boundaries)."""
    return [
        torch.tensor([[[math.cos(math.radians(d)), math.sin(math.radians(d))]]]) for d in degrees
    ]


def _feed(observer, boundaries: list[torch.Tensor]) -> None:
    stream = SimpleNamespace(
        hidden=boundaries[0], ckpt=SimpleNamespace(num_layers=len(boundaries) - 1)
    )
    observer.start_chunk(stream, torch.zeros(1, 1, dtype=torch.long))
    for index in range(len(boundaries) - 1):
        observer.after_layer(index, boundaries[index], boundaries[index + 1])
    observer.end_chunk(boundaries[-1])


def test_angular_distance_and_block_influence_known_rotations():
    # layer 0: identity, layer 1: turns the stream by 60 degrees, layer 2: by 30 more
    boundaries = _rotations([0.0, 0.0, 60.0, 90.0])
    angular = AngularDistance("last")
    _feed(angular, boundaries)
    d = angular.distances()
    expected = {1: [0.0, 1 / 3, 1 / 6], 2: [1 / 3, 1 / 2], 3: [1 / 2]}
    for n, row in expected.items():
        assert d[n] == pytest.approx(row, abs=1e-6)
    result = angular.result()
    assert result["best_block"]["1"] == {"start": 0, "end": 1, "distance": 0.0}
    assert result["best_block"]["2"]["start"] == 0
    assert result["drop_order"][0] == 0

    bi = BlockInfluence()
    _feed(bi, boundaries)
    expected_bi = [0.0, 1 - math.cos(math.radians(60)), 1 - math.cos(math.radians(30))]
    assert bi.scores() == pytest.approx(expected_bi, abs=1e-6)
    assert bi.result()["drop_order"] == [0, 2, 1]


def test_angular_token_modes_differ_only_in_positions():
    # token 0 is never turned, the last token is turned by 90 degrees
    first = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    second = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    last, mean = AngularDistance("last"), AngularDistance("mean")
    _feed(last, [first, second])
    _feed(mean, [first, second])
    assert last.distances()[1] == pytest.approx([0.5])
    assert mean.distances()[1] == pytest.approx([0.25])
    with pytest.raises(ValueError, match="token mode"):
        AngularDistance("first")


# ------------------------------------------------------------------------------ identity layer
def test_identity_layer_scores_zero_and_ranks_first_everywhere(identity_scores):
    angular = identity_scores["angular"]
    assert angular["distances"]["1"][IDENTITY_LAYER] == 0.0
    assert min(v for i, v in enumerate(angular["distances"]["1"]) if i != IDENTITY_LAYER) > 0.01
    assert angular["best_block"]["1"]["start"] == IDENTITY_LAYER
    assert identity_scores["block_influence"]["scores"][IDENTITY_LAYER] == 0.0
    assert identity_scores["taylor"]["scores"][IDENTITY_LAYER] == 0.0
    ppl = identity_scores["perplexity"]
    assert ppl["scores"][IDENTITY_LAYER] == pytest.approx(ppl["baseline"], rel=1e-9)
    for name in ("angular", "block_influence", "taylor", "perplexity"):
        assert identity_scores[name]["drop_order"][0] == IDENTITY_LAYER, name
        assert layers_to_drop(identity_scores[name], name, 1) == [IDENTITY_LAYER]


def test_agreement_finds_the_identity_layer(identity_scores):
    rows = agreement(identity_scores, num_layers=5)
    assert [r["n"] for r in rows] == [1, 2]
    assert rows[0]["majority"] == [IDENTITY_LAYER]
    assert set(rows[0]["picks"]) == set(identity_scores)


# ------------------------------------------------------------------------------ vs transformers
def test_streamed_taylor_matches_full_model_autograd(stories260k_dir: Path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 512, (5, 24), generator=torch.Generator().manual_seed(3))
    with Checkpoint.open(stories260k_dir) as ckpt:
        result = taylor_scores(ckpt, ids, batch_size=2, progress=False)
    model = AutoModelForCausalLM.from_pretrained(stories260k_dir, local_files_only=True)
    model(ids, labels=ids, use_cache=False).loss.backward()
    expected = [0.0] * 5
    signed = [0.0] * 5
    for name, param in model.named_parameters():
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            product = (param * param.grad).detach().double()
            expected[index] += float(product.abs().sum())
            signed[index] -= float(product.sum())
    assert result["scores"] == pytest.approx(expected, rel=1e-4)
    assert result["first_order_delta"] == pytest.approx(signed, rel=1e-3, abs=1e-5)
    # the sign: shrinking layer 2 towards zero by eps changes the loss by eps x the estimate
    eps, loss = 1e-3, float(model(ids, labels=ids, use_cache=False).loss)
    with torch.no_grad():
        for param in model.model.layers[2].parameters():
            param.mul_(1 - eps)
        shrunk = float(model(ids, labels=ids, use_cache=False).loss)
    assert (shrunk - loss) / eps == pytest.approx(result["first_order_delta"][2], rel=0.05)
    assert result["plus_kept"] == [0, 4]
    assert result["drop_order"] == sorted([1, 2, 3], key=lambda i: expected[i])
    assert result["memory_bytes_estimate"] > 0


def test_layer_removal_perplexity_matches_transformers(stories260k_dir: Path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 512, (3, 20), generator=torch.Generator().manual_seed(4))
    observer = LayerRemovalPerplexity(batch_size=2)
    with Checkpoint.open(stories260k_dir) as ckpt:
        forward_pass(ckpt, ids, [observer], batch_size=2, progress=False)
    result = observer.result()
    model = AutoModelForCausalLM.from_pretrained(stories260k_dir, local_files_only=True).eval()
    layers = model.model.layers
    with torch.no_grad():
        base = math.exp(float(model(ids, labels=ids, use_cache=False).loss))
        expected = []
        for removed in range(5):
            model.model.layers = torch.nn.ModuleList(
                layer for i, layer in enumerate(layers) if i != removed
            )
            expected.append(math.exp(float(model(ids, labels=ids, use_cache=False).loss)))
    assert result["baseline"] == pytest.approx(base, rel=1e-5)
    assert result["scores"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("token", ["last", "mean"])
def test_angular_and_block_influence_match_transformers_hidden_states(
    stories260k_dir: Path, calib_file: Path, token: str
):
    """Float64 reference from transformers' model: h_0 the embeddings, h_(l+1) the output of
    decoder layer l (the last one before the final norm). d(l, n) = mean arccos(cos(h_l,
    h_(l+n))) / pi at the last token (or over every token); BI_l = 1 - mean cos(h_l, h_(l+1))
    over every token. Chunked (a small memory budget) to cover the running sums."""
    from transformers import AutoModelForCausalLM

    ids = load_calibration(stories260k_dir, calib_file, nsamples=6, seqlen=40, seed=2).input_ids
    model = AutoModelForCausalLM.from_pretrained(
        stories260k_dir, local_files_only=True, dtype=torch.float64
    ).eval()
    outputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        states = [model.model.embed_tokens(ids)]
        model(ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    states += outputs
    num_layers = len(model.model.layers)

    def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    angular, bi = AngularDistance(token), BlockInfluence()
    with Checkpoint.open(stories260k_dir) as ckpt:
        forward_pass(ckpt, ids, [angular, bi], budget_mb=0.05, progress=False)
    distances = angular.distances()
    for n in range(1, num_layers + 1):
        expected = []
        for start in range(num_layers - n + 1):
            a, b = states[start], states[start + n]
            if token == "last":
                a, b = a[:, -1], b[:, -1]
            expected.append(float(torch.arccos(cosine(a, b).clamp(-1, 1)).mean()) / math.pi)
        assert distances[n] == pytest.approx(expected, abs=2e-6), n
    expected_bi = [float(1 - cosine(states[i], states[i + 1]).mean()) for i in range(num_layers)]
    assert bi.scores() == pytest.approx(expected_bi, abs=2e-6)


def test_chunked_pass_equals_single_chunk(stories260k_dir: Path):
    ids = torch.randint(3, 512, (5, 16), generator=torch.Generator().manual_seed(5))

    def run(budget_mb: float) -> list[dict]:
        observers = [AngularDistance("mean"), BlockInfluence(), LayerRemovalPerplexity()]
        with Checkpoint.open(stories260k_dir) as ckpt:
            forward_pass(ckpt, ids, observers, budget_mb=budget_mb, progress=False)
        return [o.result() for o in observers]

    whole, pieces = run(1024.0), run(0.05)  # 0.05 MiB: a window or two per chunk
    for a, b in zip(whole, pieces):
        assert b["scores"] == pytest.approx(a["scores"], rel=1e-5)


# ------------------------------------------------------------------------------ SNR
@pytest.mark.parametrize("shape", [(32, 64), (64, 256), (256, 64), (128, 128)])
def test_gaussian_noise_has_no_singular_value_above_the_edge(shape):
    for seed in range(5):
        noise = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
        result = weight_snr(noise)
        assert result.signal_count == 0, (shape, seed, result)
        assert result.snr == 0.0 and not result.infinite
        assert result.sigma == pytest.approx(0.02, rel=0.1)
        assert result.max_singular_value < result.threshold


def test_noise_false_positive_rate_is_small():
    hits = sum(
        weight_snr(torch.randn(32, 64, generator=torch.Generator().manual_seed(s))).signal_count > 0
        for s in range(100, 200)
    )
    assert hits <= 5  # the Tracy-Widom 99% allowance: about 1 in 100


def test_low_rank_signal_is_found_above_noise():
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(128, 512, generator=gen) * 0.02
    u, _ = torch.linalg.qr(torch.randn(128, 3, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(512, 3, generator=gen))
    spikes = u @ torch.diag(torch.tensor([3.0, 2.0, 1.5])) @ v.t()
    result = weight_snr(noise + spikes)
    assert result.signal_count == 3
    assert result.sigma == pytest.approx(0.02, rel=0.1)
    assert 0 < result.snr < math.inf


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_signal_filling_much_of_the_spectrum_does_not_inflate_sigma(rank):
    """Signal in more than the top 10% of a 32 x 64 spectrum (here up to half of it) landed
    in the bulk fit, inflated sigma past ||W||_F / sqrt(nm) and hid all of the signal."""
    gen = torch.Generator().manual_seed(rank)
    n, m = 32, 64
    noise = torch.randn(n, m, generator=gen, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64))
    edge = math.sqrt(n) + math.sqrt(m)
    result = weight_snr(noise + 3 * edge * u @ v.t())
    assert result.signal_count == rank
    assert result.sigma == pytest.approx(1.0, rel=0.15)
    total = float((noise + 3 * edge * u @ v.t()).square().mean().sqrt())
    assert result.sigma <= total


def test_spectrum_without_a_noise_part_is_infinite_and_dropped_first(tmp_path: Path):
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(8)))
    result = weight_snr(q[:32] * 0.5)  # every singular value 0.5: no bulk at all
    assert result.infinite and result.noise_count == 0 and result.signal_count == 32
    record = result.to_json()
    assert record["infinite"] is True and record["snr"] is None

    # a 3-layer checkpoint whose layer 1 v_proj is that matrix: flagged, first to drop
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "intermediate_size": 64,
        "vocab_size": 16,
        "max_position_embeddings": 64,  # the engine's config needs it, so every tool does
        "tie_word_embeddings": True,  # no lm_head.weight below
    }
    gen = torch.Generator().manual_seed(9)
    with CheckpointWriter(tmp_path / "m") as writer:
        writer.add("model.embed_tokens.weight", torch.randn(16, 64, generator=gen))
        writer.add("model.norm.weight", torch.ones(64))
        for i in range(3):
            for name, shape in _llama_layer_shapes().items():
                tensor = torch.randn(*shape, generator=gen) * 0.02
                if name == "self_attn.v_proj.weight" and i == 1:
                    tensor = q[:32] * 0.5
                writer.add(f"model.layers.{i}.{name}", tensor)
        writer.finish(config, None)
    with Checkpoint.open(tmp_path / "m") as ckpt:
        scores = snr_scores(ckpt)
    assert scores["infinite_layers"] == [1]
    assert scores["drop_order"][0] == 1
    assert scores["scores"][1] is None and scores["scores"][0] == 0.0


def _llama_layer_shapes() -> dict[str, tuple[int, ...]]:
    return {
        "input_layernorm.weight": (64,),
        "post_attention_layernorm.weight": (64,),
        "self_attn.q_proj.weight": (64, 64),
        "self_attn.k_proj.weight": (32, 64),
        "self_attn.v_proj.weight": (32, 64),
        "self_attn.o_proj.weight": (64, 64),
        "mlp.gate_proj.weight": (64, 64),
        "mlp.up_proj.weight": (64, 64),
        "mlp.down_proj.weight": (64, 64),
    }


def test_marchenko_pastur_quantiles_match_simulation():
    gen = torch.Generator().manual_seed(10)
    n, m = 300, 600
    singular = torch.linalg.svdvals(torch.randn(n, m, generator=gen, dtype=torch.float64))
    scaled = singular / math.sqrt(m)
    probs = (0.1, 0.25, 0.5, 0.75, 0.9)
    expected = [float(torch.quantile(scaled, p)) for p in probs]
    assert mp_singular_quantiles(n / m, probs) == pytest.approx(expected, rel=0.01)
    square = mp_singular_quantiles(1.0, (0.5,))[0]  # median of the quarter-circle law
    assert square == pytest.approx(0.808, abs=0.005)
    with pytest.raises(ValueError, match="beta"):
        mp_singular_quantiles(1.5, (0.5,))


def test_snr_refuses_a_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        weight_snr(torch.randn(4, 4, 4))


# ------------------------------------------------------------------------------ selection
def test_plus_keep_scales_with_depth_and_accepts_counts():
    assert plus_keep(32) == [0, 1, 2, 3, 30, 31]  # Shortened LLaMA's 4 first, 2 last
    assert plus_keep(5) == [0, 4]
    assert plus_keep(5, first=0, last=0) == []
    with pytest.raises(ValueError, match=">= 0"):
        plus_keep(5, first=-1)


def test_layers_to_drop_per_criterion_and_errors():
    angular = {"best_block": {"1": {"start": 3, "end": 4}, "2": {"start": 1, "end": 3}}}
    assert layers_to_drop(angular, "angular", 2) == [1, 2]
    taylor = {"drop_order": [2, 1, 3]}
    assert layers_to_drop(taylor, "taylor+", 2) == [1, 2]
    with pytest.raises(ValueError, match="at most 3 layers.*Taylor\\+ never drops"):
        layers_to_drop(taylor, "taylor", 4)
    with pytest.raises(ValueError, match="no block of 3 layers"):
        layers_to_drop(angular, "angular", 3)
    with pytest.raises(ValueError, match="positive integer"):
        layers_to_drop(taylor, "taylor", 0)
    with pytest.raises(ValueError, match="unknown criterion 'cosine'.*angular"):
        canonical_criterion("cosine")
    assert canonical_criterion("PPL") == "perplexity" and canonical_criterion("bi") == (
        "block_influence"
    )
