"""The command line, through click's CliRunner, with exact output where it is ours to fix."""

from __future__ import annotations

from conftest import FIXTURES, read_tables, run_cli
from flowscan.tables import read_metadata


def test_analyze_prints_sigma_per_block_and_writes_five_tables(tmp_path):
    result = run_cli("analyze", FIXTURES / "closed-form" / "flowscan", "-o", tmp_path, "--blocks", "a=^a\\.")
    lines = result.output.splitlines()
    assert "run flowscan  [flowscan, 5 rounds, density 1.000 -> 0.410, blocks: a=^a\\.]" in lines
    # lambda = c^sigma = 1.25^0.5 exactly; both checks pass on this closed form
    assert "  a              +1.1180 ± 0.0000        +0.5000 ± 0.0000    +0.5000      4    yes  yes  relevant" in lines
    assert "  irrelevant: (other); relevant: a" in lines
    assert "1 run(s) analysed, 0 failed." in lines
    tables = read_tables(tmp_path)
    assert abs(tables["eigen"].filter(block="a", quantity="M")["sigma_mean"][0] - 0.5) < 1e-9
    meta = read_metadata(tmp_path / "rounds.parquet")
    assert meta["blocks"] == "a=^a\\."
    assert meta["flowscan_version"]
    assert meta["command"].startswith("flowscan analyze")


def test_the_tables_read_the_same_through_pyarrow_with_their_metadata(tmp_path):
    """Users open the tables with pyarrow (or pandas) too: the same columns, values and file metadata."""
    import pyarrow.parquet as pq

    run_cli("analyze", FIXTURES / "closed-form" / "flowscan", "-o", tmp_path, "-q")
    for name, frame in read_tables(tmp_path).items():
        path = tmp_path / f"{name}.parquet"
        table = pq.read_table(path)
        assert table.column_names == frame.columns
        assert table.to_pylist() == frame.to_dicts()
        meta = {k.decode(): v.decode() for k, v in pq.ParquetFile(path).metadata.metadata.items()}
        assert meta["flowscan.command"].startswith("flowscan analyze") and "flowscan.analysis_id" in meta
        assert read_metadata(path)["analysis_id"] == meta["flowscan.analysis_id"]


def test_inspect_lists_runs_rounds_tensors_and_blocks_without_writing(tmp_path):
    result = run_cli("inspect", FIXTURES / "closed-form" / "flowscan", "--blocks", r"^(a|b)\.")
    out = result.output
    assert out.startswith("run flowscan  [format flowscan]  ")
    assert "  rounds: complete 0-4\n" in out
    assert "[test_accuracy=0.9]" in out
    assert "  masks: stored; blocks: ^(a|b)\\.\n" in out
    assert "  prunable tensors: 4 (3,750 parameters)\n" in out
    assert "    a.0.weight   (25, 25)              -> a\n" in out
    assert "    rest.weight  (75, 25)              -> (other)\n" in out
    assert "  not prunable (no mask): 1 tensor(s), e.g. a.0.bias\n" in out
    assert "  matched no block rule (-> (other)): rest.weight\n" in out


def test_inspect_shows_the_auto_detected_preset_and_layout_notes():
    out = run_cli("inspect", FIXTURES / "torch-prune").output
    assert "run seed0  [format prune-style]" in out
    # real names, not a placeholder
    assert "  note: round files: 0checkpoint.pth.tar, 1checkpoint.pth.tar, 2checkpoint.pth.tar, ...\n" in out
    assert "  note: ignored: 0model_SA_best.pth.tar, 1model_SA_best.pth.tar, 2model_SA_best.pth.tar, ...\n" in out
    assert "blocks: resnet-stages (auto-detected)" in out
    assert "    layer1.0.conv1.weight  (8, 8, 3, 3)          -> layer1\n" in out


def test_format_option_forces_a_reader(tmp_path):
    out = run_cli("inspect", FIXTURES / "closed-form" / "flowscan", "--format", "safetensors").output
    assert "[format safetensors]" in out  # the round folders read as plain safetensors folders
    bad = run_cli("inspect", FIXTURES, "--format", "nope", expect=2)
    assert "unknown format 'nope'" in bad.output


def test_invalid_block_regex_is_a_usage_error(tmp_path):
    result = run_cli("analyze", FIXTURES / "closed-form", "-o", tmp_path, "--blocks", "x=(", expect=2)
    assert "invalid regular expression" in result.output


def test_select_keeps_one_encoder_and_strips_its_prefix(tmp_path):
    import torch

    run = tmp_path / "moco"
    run.mkdir()
    for k in range(3):
        w = torch.randn(4, 4)
        mask = (torch.rand(4, 4) > 0.2 * k).float()
        torch.save({"state_dict": {"module.encoder_q.layer1.0.conv1.weight_orig": w,
                                   "module.encoder_q.layer1.0.conv1.weight_mask": mask,
                                   "module.encoder_k.layer1.0.conv1.weight_orig": w * 3,
                                   "module.encoder_k.layer1.0.conv1.weight_mask": mask}},
                   run / f"{k}checkpoint.pth.tar")
    out = run_cli("inspect", run, "--select", "encoder_q", "--blocks", "resnet-stages").output
    assert "    layer1.0.conv1.weight  (4, 4)                -> layer1\n" in out
    assert "encoder_k" not in out


def test_formats_lists_readers_and_presets():
    out = run_cli("formats").output
    for name in ("flowscan", "open_lth", "bert-tickets", "prune-style", "safetensors",
                 "resnet-stages", "resnet-blocks", "openlth-cifar-stages", "bert-layers"):
        assert f"  {name} " in out


def test_inspect_exits_non_zero_when_a_run_cannot_be_read(tmp_path, copy_fixture):
    run = copy_fixture("closed-form/prune-style", "run")
    (run / "2checkpoint.pth.tar").write_bytes(b"not a checkpoint")
    result = run_cli("inspect", run, expect=1)
    assert f"  ERROR: {run / '2checkpoint.pth.tar'}: not a" in result.output


def test_forced_format_that_finds_nothing_says_what_it_looked_for(tmp_path):
    result = run_cli("analyze", FIXTURES / "closed-form" / "flowscan", "-o", tmp_path, "--format", "open_lth", expect=1)
    assert "no IMP runs found; it holds" in result.output and "(looked for: open_lth)" in result.output
    assert "flowscan formats" in result.output
