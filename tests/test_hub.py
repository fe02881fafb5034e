"""Model card and push of a pruned checkpoint, over real HTTP against the LocalHub test server."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import hfprune
from hfprune.hub import HubPushError, checkpoint_files, push_pruned
from hfprune.model_card import CHART_FILE, build_model_card, hub_id, width_chart, write_model_card
from tests.tiny_models import batch, tiny_model, tiny_tokenizer

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = "test-user/tiny-pruned"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(batch()).logits


def _widths(model) -> list[dict]:
    from hfprune.structure import discover

    return [layer.widths() for layer in discover(model, protected_layers=())]


def _report(widths: list[dict], original: dict, before: int, after: int, prunable: int, **extra) -> dict:
    removed = before - after
    return {
        "base_model": BASE,
        "criterion": "magnitude",
        "target_sparsity": 0.3,
        "reached": {
            "prunable_params": prunable, "removed_params": removed, "remaining_params": after,
            "total_params": before, "sparsity": removed / prunable, "total_sparsity": removed / before,
        },
        "pruning_config": {"importance": "magnitude", "structures": ["heads", "channels"], "schedule": "one_shot",
                           "uniform": True, "target_sparsity": 0.3},
        "layers": [{"layer": i, **w, "original": original} for i, w in enumerate(widths)],
        "datasets": ["tatsu-lab/alpaca", "/data/local/c4_sample.jsonl"],
        **extra,
    }


EVALUATION = {  # the shape of EvaluationReport.to_dict(); numbers are test data
    "pruned": {"name": "/tmp/out", "params": 96832, "perplexity": {"wikitext2": 31.5, "/data/c4_val.txt": 40.25},
               "zero_shot": {}, "speed": None, "flops_per_token": None, "layer_widths": None},
    "dense": {"name": "/tmp/base", "params": 131648, "perplexity": {"wikitext2": 25.0, "/data/c4_val.txt": 30.0},
              "zero_shot": {}, "speed": None, "flops_per_token": None, "layer_widths": None},
    "prefill_speedup": 1.31, "decode_speedup": 1.12, "flops_speedup_limit": None, "settings": {"seq_len": 64},
}


@pytest.fixture
def stock_checkpoint(tmp_path):
    """A uniformly pruned tiny Llama saved as a stock checkpoint (no hfprune.export): (dir, model)."""
    from hfprune.sparsity import count_parameters

    model = tiny_model("llama")
    original = _widths(model)[0]
    before = count_parameters(model)
    config = hfprune.PruningConfig(importance="magnitude", target_sparsity=0.3, uniform=True, protected_layers=(),
                                   head_granularity="query_head", head_sparsity=0.5, channel_sparsity=0.25)
    hfprune.prune_model(model, config)
    widths = _widths(model)
    assert all(w == widths[0] for w in widths) and widths[0]["num_attention_heads"] < original["num_attention_heads"]
    for key, value in widths[0].items():
        setattr(model.config, key, value)
    if hasattr(model.config, "pruned_layer_widths"):
        del model.config.pruned_layer_widths
    after = count_parameters(model)
    prunable = sum(p.numel() for n, p in tiny_model("llama").named_parameters() if "proj" in n)
    directory = tmp_path / "pruned"
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    report = _report(widths, original, before, after, prunable, evaluation=EVALUATION)
    (directory / "pruning_report.json").write_text(json.dumps(report, indent=2))
    return directory, model


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ---- card ------------------------------------------------------------------------------------------------


def test_model_card_metadata_and_body(stock_checkpoint):
    directory, model = stock_checkpoint
    write_model_card(directory, repo_id=REPO)
    card = ModelCard.load(directory / "README.md")
    data = card.data
    assert data.base_model == BASE and data.base_model_relation == "finetune"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"hfprune", "pruned", "structured-pruning", "magnitude"} <= set(data.tags)
    assert data.datasets == ["tatsu-lab/alpaca"]  # local files are named in the body only
    perplexities = {r.dataset_name: r.metric_value for r in data.eval_results if r.metric_type == "perplexity"}
    assert perplexities == {"wikitext2": 31.5, "c4_val": 40.25}  # the pruned model's, as measured
    assert data.model_name == "tiny-pruned"

    text = card.text
    report = json.loads((directory / "pruning_report.json").read_text())
    reached = report["reached"]
    assert f"{reached['total_params']:,} → {reached['remaining_params']:,}" in text
    assert f"{100 * reached['sparsity']:.2f}%" in text and f"{100 * reached['total_sparsity']:.2f}%" in text
    assert "30.00%" in text  # target
    assert "| 0–3 | 4/8 | 2/2 | 72/96 |" in text  # identical layers share one row
    assert f"![kept widths]({CHART_FILE})" in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in text
    assert "trust_remote_code" not in text  # a stock checkpoint needs no remote code
    assert "| perplexity wikitext2 (seq 64) | 25.00 | 31.50 | 1.26x |" in text
    assert "/tmp/" not in text and "/data/" not in text  # no local paths leak onto the card

    chart = directory / CHART_FILE
    assert _png_size(chart) == (800, 480) and chart.stat().st_size < 100_000
    first = chart.read_bytes()
    write_model_card(directory, repo_id=REPO)
    assert chart.read_bytes() == first  # deterministic
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temp files left


def test_card_reports_only_what_the_report_holds(tmp_path):
    directory = tmp_path / "bare"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "_name_or_path": "/local/base"}))
    (directory / "pruning_report.json").write_text(json.dumps({"layers": [{"index": 0, "intermediate_size": 5}]}))
    card = build_model_card(directory)
    assert card.data.base_model is None and getattr(card.data, "base_model_relation", None) is None
    assert card.data.eval_results is None and "model-index" not in str(card)
    assert "sparsity" not in card.text and "## Measured" not in card.text and "→" not in card.text
    assert "| 0 | ? | ? | 5 |" in card.text
    assert width_chart(json.loads((directory / "pruning_report.json").read_text()), directory / CHART_FILE) is None
    write_model_card(directory)
    assert not (directory / CHART_FILE).exists() and "![kept widths]" not in (directory / "README.md").read_text()


def test_base_model_and_license_resolution(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--base-7b" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    assert hub_id(str(snapshot)) == "org/base-7b"
    assert hub_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert hub_id(str(tmp_path)) is None and hub_id("../x/y") is None and hub_id(None) is None

    base = tmp_path / "local-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# base\n")
    directory = tmp_path / "pruned"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "pruning_report.json").write_text(json.dumps({"base_model": str(base), "criterion": "lora"}))
    card = build_model_card(directory)
    assert card.data.base_model is None  # a local path is not a hub id
    assert card.data.license == "apache-2.0" and card.data.language == ["en"]
    assert "lora-prune" in card.data.tags and "local checkpoint (`local-base`)" in card.text


# ---- validation ------------------------------------------------------------------------------------------


def test_pickles_are_refused_before_any_network_call(stock_checkpoint, local_hub):
    from hfprune.export.safety import PickleCheckpointError

    directory, _ = stock_checkpoint
    (directory / "training_args.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(PickleCheckpointError, match=r"training_args\.bin.*pickle"):
        push_pruned(directory, REPO)
    assert local_hub.requests == [] and not local_hub.repo_exists(REPO)
    assert not (directory / "README.md").exists()  # nothing written either


def test_incomplete_checkpoints_are_refused(stock_checkpoint):
    directory, _ = stock_checkpoint
    (directory / "pruning_report.json").rename(directory / "report.json")
    with pytest.raises(FileNotFoundError, match="pruning_report.json"):
        checkpoint_files(directory)
    (directory / "report.json").rename(directory / "pruning_report.json")
    (directory / "model.safetensors").rename(directory / "weights.data")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        checkpoint_files(directory)


# ---- push ------------------------------------------------------------------------------------------------


def test_push_is_one_commit_and_loads_back(stock_checkpoint, local_hub, tmp_path):
    directory, model = stock_checkpoint
    url = push_pruned(directory, REPO)
    commits = local_hub.commits(REPO)
    assert len(commits) == 2 and commits[1]["title"] == "initial commit"
    assert url.oid == commits[0]["oid"] == local_hub.head(REPO)
    assert commits[0]["title"].startswith("Upload pruned model (")
    files = local_hub.list_files(REPO)
    assert set(files) == {".gitattributes", *checkpoint_files(directory)}
    assert {"README.md", CHART_FILE, "pruning_report.json", "config.json", "model.safetensors"} <= set(files)
    assert ModelCard.load(REPO).data.base_model == BASE  # the card, read back through the Hub API

    loaded = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=tmp_path / "fresh-cache").eval()
    assert loaded.config.num_attention_heads == 4 and loaded.config.intermediate_size == 72
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=0)


def test_push_again_replaces_stale_weights_in_one_commit(stock_checkpoint, local_hub, tmp_path):
    directory, model = stock_checkpoint
    push_pruned(directory, REPO)
    (directory / "model.safetensors").unlink()
    model.save_pretrained(directory, max_shard_size="100KB")  # now sharded, with an index
    push_pruned(directory, REPO, commit_message="Sharded")
    commits = local_hub.commits(REPO)
    assert len(commits) == 3 and commits[0]["title"] == "Sharded"
    files = local_hub.list_files(REPO)
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    loaded = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=tmp_path / "fresh-cache").eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=0)


def test_wrong_token_is_a_clear_401(stock_checkpoint, local_hub):
    directory, _ = stock_checkpoint
    with pytest.raises(HubPushError) as caught:
        push_pruned(directory, REPO, token="hf_wrong")
    message = str(caught.value)
    assert caught.value.status == 401 and REPO in message and "401" in message
    assert "hf auth login" in message and "HF_TOKEN" in message
    assert not local_hub.repo_exists(REPO)


def test_forbidden_namespace_is_a_clear_403(stock_checkpoint, local_hub):
    directory, _ = stock_checkpoint
    local_hub.forbidden_repos.add("test-org/*")
    with pytest.raises(HubPushError) as caught:
        push_pruned(directory, "test-org/tiny-pruned")
    message = str(caught.value)
    assert caught.value.status == 403 and "403" in message and "test-org/tiny-pruned" in message
    assert "no write access" in message and "'test-org'" in message


def test_server_error_on_commit_leaves_the_repo_unchanged(stock_checkpoint, local_hub):
    directory, _ = stock_checkpoint
    push_pruned(directory, REPO)
    before = (local_hub.head(REPO), local_hub.files(REPO))
    report = json.loads((directory / "pruning_report.json").read_text())
    (directory / "pruning_report.json").write_text(json.dumps({**report, "criterion": "random"}))
    local_hub.fail_next_commit = 500
    with pytest.raises(HubPushError) as caught:
        push_pruned(directory, REPO)
    message = str(caught.value)
    assert caught.value.status == 500 and REPO in message and "nothing was committed" in message
    assert (local_hub.head(REPO), local_hub.files(REPO)) == before
    assert len(local_hub.commits(REPO)) == 2


def test_first_push_failing_leaves_only_the_initial_commit(stock_checkpoint, local_hub):
    directory, _ = stock_checkpoint
    local_hub.inject_fault("commit", 404)
    with pytest.raises(HubPushError, match=r"404.*not found"):
        push_pruned(directory, REPO)
    assert local_hub.list_files(REPO) == [".gitattributes"] and len(local_hub.commits(REPO)) == 1


def test_push_to_a_new_branch(stock_checkpoint, local_hub):
    directory, _ = stock_checkpoint
    push_pruned(directory, REPO, revision="pruned-30")
    assert "config.json" in local_hub.list_files(REPO, revision="pruned-30")
    assert local_hub.list_files(REPO) == [".gitattributes"]


def test_user_card_is_kept_generated_card_is_refreshed(stock_checkpoint, local_hub):
    directory, _ = stock_checkpoint
    write_model_card(directory)  # no repo id yet: placeholder in the snippets
    assert "path/to/this/checkpoint" in (directory / "README.md").read_text()
    push_pruned(directory, REPO)
    assert f'from_pretrained("{REPO}")' in local_hub.files(REPO)["README.md"].decode()

    # written for this repo with caller metadata (what PruningTrainer.create_model_card does): kept as is
    write_model_card(directory, repo_id=REPO, metadata={"license": "mit", "tags": ["my-tag"], "language": "en"})
    push_pruned(directory, REPO.split("/")[1])  # a bare name goes to the token's user namespace
    remote = ModelCard(local_hub.files(REPO)["README.md"].decode()).data
    assert remote.license == "mit" and remote.language == "en" and {"hfprune", "my-tag"} <= set(remote.tags)

    (directory / "README.md").write_text("---\nlicense: mit\n---\n# my own card\n")
    push_pruned(directory, REPO)
    assert local_hub.files(REPO)["README.md"].decode().endswith("# my own card\n")


# ---- heterogeneous checkpoints (hfprune.export) ----------------------------------------------------------


@pytest.fixture
def heterogeneous_checkpoint(tmp_path):
    export = pytest.importorskip("hfprune.export")
    if not hasattr(export, "save_pruned"):
        pytest.skip("hfprune.export.save_pruned is not available")
    model = tiny_model("llama")
    hfprune.prune_model(model, hfprune.PruningConfig(importance="magnitude", target_sparsity=0.3,
                                                     protected_layers=(3,)))
    directory = export.save_pruned(model, tmp_path / "hetero", tokenizer=tiny_tokenizer(), uniform=False,
                                   report={"base_model": BASE, "criterion": "magnitude"})
    return Path(directory), model


def test_heterogeneous_checkpoint_card_and_push(heterogeneous_checkpoint, local_hub, tmp_path):
    directory, model = heterogeneous_checkpoint
    assert json.loads((directory / "config.json").read_text()).get("auto_map")
    card = build_model_card(directory, repo_id=REPO)
    assert "trust_remote_code=True" in card.text and "register_auto_classes()" in card.text
    push_pruned(directory, REPO)
    files = local_hub.list_files(REPO)
    assert {"configuration_hfprune.py", "modeling_hfprune.py", CHART_FILE} <= set(files)
    assert len(local_hub.commits(REPO)) == 2

    # Both loading paths the card gives: remote code, then hfprune's registered classes.
    remote = AutoModelForCausalLM.from_pretrained(REPO, trust_remote_code=True, cache_dir=tmp_path / "c1").eval()
    torch.testing.assert_close(_logits(remote), _logits(model), atol=1e-5, rtol=0)
    from hfprune.export import register_auto_classes

    register_auto_classes()
    local = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=tmp_path / "c2").eval()
    torch.testing.assert_close(_logits(local), _logits(model), atol=1e-5, rtol=0)


def test_unreachable_hub_is_a_clear_error(stock_checkpoint, local_hub):
    import huggingface_hub

    directory, _ = stock_checkpoint
    url = local_hub.url
    local_hub.stop()  # the fixture starts it again after the test
    huggingface_hub.close_session()
    with pytest.raises(HubPushError, match="could not reach the Hub") as caught:
        push_pruned(directory, REPO)
    assert caught.value.status is None and url in str(caught.value) and REPO in str(caught.value)
