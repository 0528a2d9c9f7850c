"""baseline, rtn, gptq built directly: the save/reload check and measured facts."""

from __future__ import annotations

from byoai.tasks.build import RELOAD_TOLERANCE


def test_rtn_artifact_reloads_exactly_and_reports_facts(tiny_bench):
    artifact = tiny_bench.build("rtn", {"bits": 4, "group_size": 32})
    assert artifact.facts["format"] == "compressed-tensors"
    assert artifact.facts["reload_rel_err"] <= RELOAD_TOLERANCE
    assert artifact.facts["quantized_layers"] == 14  # 2 layers x (4 attention + 3 MLP projections)
    assert 0 <= artifact.facts["sparsity"] < 0.2


def test_packed_checkpoint_loads_decompressed_as_transformers_would(tiny_bench):
    """load_model decompresses llm-compressor's packed int4 module by module right after loading
    (handing back the packed pages, tasks.techniques.io.decompress_releasing_pages); the model it
    returns computes exactly what transformers' own first-forward decompression computes."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from byoai.tasks.techniques.io import load_model

    folder = Path(tiny_bench.build("rtn", {"bits": 4, "group_size": 32}).path)
    ours, _ = load_model(folder)
    assert not hasattr(ours, "ct_decompress_hook")  # nothing left to decompress at the first forward
    projection = ours.model.layers[0].mlp.down_proj
    assert not hasattr(projection, "weight_packed") and projection.weight.dtype == torch.float32
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hasattr(theirs, "ct_decompress_hook")
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_chain_stage_feeds_the_next(tiny_bench):
    first = tiny_bench.build("rtn", {"bits": 8, "group_size": 32})
    second = tiny_bench.build("gptq", {"bits": 4, "group_size": 32}, model=first.as_model())
    assert second.path != first.path and second.size_bytes < first.size_bytes
    # the same chain again is the same content-addressed folder
    assert tiny_bench.build("gptq", {"bits": 4, "group_size": 32}, model=first.as_model()).path == second.path


def test_concurrent_loads_in_threads_keep_weight_tying(tmp_path):
    """The threads runner loads models in parallel; transformers' no_tie_weights() swaps a class
    attribute while it builds a model, so overlapping loads could leave tying off for the whole
    process (a tied model then loads with a random lm_head). model_loading() serializes loads."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import PreTrainedModel

    from byoai.tasks.techniques.io import load_model
    from tests.tiny import make_tiny_model

    tied = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    original = PreTrainedModel.tie_weights
    with ThreadPoolExecutor(max_workers=4) as pool:
        models = list(pool.map(lambda _: load_model(tied)[0], range(16)))
    assert PreTrainedModel.tie_weights is original
    assert all(m.lm_head.weight is m.model.embed_tokens.weight for m in models)
    fresh, _ = load_model(tied)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
