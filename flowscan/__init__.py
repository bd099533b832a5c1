"""flowscan: renormalization-group flow analysis of iterative magnitude pruning checkpoints.

From Python, one call gives the tables `flowscan analyze` writes (nothing is written):

    import flowscan
    frames = flowscan.analyze("ckpts/", blocks=["resnet-stages"])
    frames["eigen"]        # a polars DataFrame per table: runs, rounds, steps, eigen, metrics, survival
    flowscan.inspect("ckpts/")["tensors"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:   # heavy imports stay inside the functions: `import flowscan` is instant
    import polars as pl

__version__ = "0.1.0"


def _options(blocks: str | Sequence[str] | None, options: dict):
    from flowscan import pipeline
    from flowscan.blocks import BlockRules
    from flowscan.readers.base import NameOptions

    rules = [blocks] if isinstance(blocks, str) else list(blocks or [])
    names = NameOptions(strip_model_prefix=options.pop("strip_model_prefix", False), select=options.pop("select", None))
    return pipeline.Options(blocks=BlockRules.parse(rules), names=names, **options)


def analyze(path, blocks: str | Sequence[str] | None = None, **options) -> dict[str, "pl.DataFrame"]:
    """Every IMP run below `path` (a folder or a store URL), analysed: the tables of `flowscan analyze`
    as polars DataFrames by name. `blocks`: block rules as on the command line (a preset, LABEL=REGEX
    or REGEX; default: detect a preset). Other options are `pipeline.Options` fields and name options:
    format, select, strip_model_prefix, infer_masks, jobs, engine, cache_dir, verify, strict."""
    from flowscan import pipeline, tables

    return tables.build_tables(pipeline.analyze(path, _options(blocks, options)))


def inspect(path, blocks: str | Sequence[str] | None = None, **options) -> dict[str, "pl.DataFrame"]:
    """What `flowscan inspect` shows, as two DataFrames: `runs` (format, complete/missing/incomplete
    rounds, error, notes) and `tensors` (each run's prunable tensors, their shapes and blocks)."""
    import polars as pl

    from flowscan import pipeline, summary

    opts = _options(blocks, options)
    items = pipeline.inspect_runs(pipeline.find_runs(path, opts), opts)
    runs = pl.DataFrame([{"run": i.run.name, "path": str(i.run.path), "format": i.run.format,
                          **{k: v for k, v in summary.completeness_data(i.run).items() if k != "incomplete"},
                          "error": i.error, "notes": "; ".join(i.run.notes) or None} for i in items],
                        schema={"run": pl.String, "path": pl.String, "format": pl.String,
                                "complete_rounds": pl.List(pl.Int64), "missing_rounds": pl.List(pl.Int64),
                                "incomplete_rounds": pl.List(pl.Int64), "error": pl.String, "notes": pl.String})
    tensors = pl.DataFrame([{"run": i.run.name, "tensor": name, "shape": list(i.tensors[name].shape), "block": label}
                            for i in items for name, label in zip(i.prunable, i.labels)],
                           schema={"run": pl.String, "tensor": pl.String, "shape": pl.List(pl.Int64),
                                   "block": pl.String})
    return {"runs": runs, "tensors": tensors}
