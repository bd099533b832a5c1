"""Archives read from a store: a local HTTP server (with and without Range, as http.server is) and
a real S3-compatible server (moto). The tables must equal the local ones, and header-only work
must fetch only headers: the servers count the bytes they send."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from conftest import FIXTURES, analyze, read_tables, run_cli
from servers import big_run, file_server, s3_server, upload

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

ARCHIVES = ["closed-form", "torch-prune", "open_lth", "hf-sharded", "bert-tickets", "flax", "keras", "orbax"]


def same_tables(remote: dict, local: dict) -> None:
    for name, frame in local.items():
        other = remote[name]
        if name == "runs":  # file locations differ by their scheme and host only
            frame, other = frame.drop("path", "error"), other.drop("path", "error")
        assert_frame_equal(other, frame, check_exact=True)


@pytest.fixture(scope="module")
def local_tables(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return {name: analyze(FIXTURES / name, out / name) for name in ARCHIVES}


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_http_archives_give_the_local_tables(tmp_path, local_tables, ranges):
    with file_server(FIXTURES, ranges=ranges) as server:
        for name in ARCHIVES:
            tables = analyze(f"{server.url}/{name}/", tmp_path / name)
            assert tables["runs"]["status"].to_list() == local_tables[name]["runs"]["status"].to_list()
            assert tables["runs"]["path"][0].startswith(server.url)
            same_tables(tables, local_tables[name])


def test_s3_archives_give_the_local_tables(tmp_path, local_tables):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with s3_server() as endpoint:
        upload(endpoint, FIXTURES, "ckpts", "archive")
        for name in ARCHIVES:
            same_tables(analyze(f"s3://ckpts/archive/{name}", tmp_path / name), local_tables[name])
        # a new process (another str hash seed) finds every round in the cache: keys are stable
        cache = tmp_path / "closed-form" / ".cache"
        before = sorted(p.name for p in cache.iterdir())
        subprocess.run([sys.executable, "-m", "flowscan", "analyze", "s3://ckpts/archive/closed-form", "-o",
                        str(tmp_path / "closed-form"), "-q"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": "12345"})
        assert sorted(p.name for p in cache.iterdir()) == before
        # worker processes get the store by pickling, with its settings from the environment
        tables = analyze("s3://ckpts/archive/closed-form", tmp_path / "processes", "--engine", "processes",
                         "-j", "2")
        same_tables(tables, local_tables["closed-form"])


def test_remote_reads_fetch_headers_only_where_no_data_is_needed(tmp_path):
    pytest.importorskip("torch")
    st, pt = big_run(tmp_path / "archive")
    file_bytes = sum(p.stat().st_size for p in st.iterdir())
    with file_server(tmp_path / "archive") as server:
        for folder, header_budget in (("st", 3 * 64 << 10), ("pt", 3 * 96 << 10)):
            server.sent = 0
            shown = run_cli("inspect", f"{server.url}/{folder}/", "--json").output
            assert '"enc.weight"' in shown
            assert server.sent < header_budget, (folder, server.sent)
            local = analyze(tmp_path / "archive" / folder, tmp_path / f"local-{folder}", "--select", "enc")
            server.sent = 0
            remote = analyze(f"{server.url}/{folder}/", tmp_path / f"remote-{folder}", "--select", "enc")
            same_tables(remote, local)
            # the selected layer's weights and masks, plus headers: not the other layer's bytes
            assert server.sent < 0.55 * file_bytes + header_budget, (folder, server.sent, file_bytes)


def test_a_server_without_range_is_never_read_at_the_wrong_offset(tmp_path):
    st, _ = big_run(tmp_path / "archive", rounds=1)
    local = analyze(st, tmp_path / "local")
    with file_server(tmp_path / "archive", ranges=False) as server:
        remote = analyze(f"{server.url}/st/", tmp_path / "remote")
    same_tables(remote, local)
    assert remote["rounds"]["n_unpruned"].sum() == local["rounds"]["n_unpruned"].sum() > 0


def test_remote_tensor_bytes_are_checked_for_length(tmp_path):
    """A server that answers a tensor's range with fewer bytes than asked (a faulty proxy) costs
    the round, with a message, not a wrong number."""
    big_run(tmp_path / "archive", rounds=1)
    with file_server(tmp_path / "archive", short_ranges=True) as server:
        run_cli("analyze", f"{server.url}/st/", "-o", tmp_path / "out", "-q", expect=1)
    errors = pl.read_parquet(tmp_path / "out" / "runs.parquet")["error"][0]
    assert "st/round_0.safetensors" in errors and "the store returned 2097151 bytes for a range of 2097152" in errors, \
        errors


def test_missing_remote_folders_and_stores_are_named(tmp_path, monkeypatch):
    with file_server(FIXTURES) as server:
        result = run_cli("analyze", f"{server.url}/no-such-folder/", "-o", tmp_path / "o", expect=1)
        assert "no-such-folder" in result.output and "not a folder" in result.output
    result = run_cli("analyze", "nosuchprotocol://bucket/x", "-o", tmp_path / "o", expect=2)
    assert "nosuchprotocol" in result.output
    monkeypatch.setitem(sys.modules, "fsspec", None)   # fsspec not installed
    from flowscan.io import location

    monkeypatch.setattr(location, "_STORES", {})
    result = run_cli("analyze", "s3://bucket/x", "-o", tmp_path / "o", expect=2)
    assert "pip install 'flowscan[remote]'" in result.output


def test_a_remote_analysis_resumes_from_its_cache(tmp_path):
    with file_server(FIXTURES) as server:
        url = f"{server.url}/closed-form/safetensors/"
        first = analyze(url, tmp_path / "out")
        server.sent = 0
        # a new process (another str hash seed): listings and sizes only, every round's sums cached
        env = {**os.environ, "PYTHONHASHSEED": "12345"}
        subprocess.run([sys.executable, "-m", "flowscan", "analyze", url, "-o", str(tmp_path / "out"), "-q"],
                       check=True, env=env, capture_output=True)
        assert server.sent < 20_000, server.sent
    same_tables(read_tables(tmp_path / "out"), first)


def test_local_file_urls_are_local_paths(tmp_path):
    local = analyze(FIXTURES / "closed-form" / "npz", tmp_path / "a")
    same_tables(analyze(f"file://{FIXTURES / 'closed-form' / 'npz'}", tmp_path / "b"), local)


def test_formats_lists_the_stores_and_a_missing_store_package_is_named(tmp_path, monkeypatch):
    import json
    from importlib.util import find_spec

    stores = json.loads(run_cli("formats", "--json").output)["stores"]
    assert stores["s3://"].endswith("ready") and stores["https://"].endswith("ready")
    if find_spec("gcsfs") is None:
        assert "needs gcsfs (pip install gcsfs)" in stores["gs://"]
        result = run_cli("analyze", "gs://bucket/x", "-o", tmp_path / "o", expect=2)
        assert "gs:// needs gcsfs: pip install gcsfs" in result.output


def test_a_server_error_costs_only_its_run(tmp_path, monkeypatch):
    """A 500 on one file: a named error; the other runs (small files and large ones) analysed."""
    import servers

    root = tmp_path / "archive"
    for name in ("good", "failing"):
        shutil.copytree(FIXTURES / "closed-form" / "safetensors", root / name)
    big_run(root / "big", rounds=1)
    original = servers._Handler.do_GET

    def do_get(self):
        if "failing/round_2" in self.path or "big/pt/0checkpoint" in self.path and "Range" in self.headers:
            self.send_error(500)
            return None
        return original(self)

    monkeypatch.setattr(servers._Handler, "do_GET", do_get)
    with file_server(root) as server:
        result = run_cli("analyze", f"{server.url}/", "-o", tmp_path / "out", "-q", expect=1)
    runs = pl.read_parquet(tmp_path / "out" / "runs.parquet")
    status, errors = dict(zip(runs["run"], runs["status"])), dict(zip(runs["run"], runs["error"]))
    assert status["good"] == "ok" and status["big/st"] == "ok", runs
    assert "failing/round_2.safetensors" in errors["failing"], errors["failing"]
    assert "big/pt/0checkpoint.pth.tar" in errors["big/pt"], errors["big/pt"]
    assert "Traceback" not in result.output


def test_remote_keras_inspect_reads_hdf5_metadata_only(tmp_path):
    h5py = pytest.importorskip("h5py")
    import numpy as np

    run = tmp_path / "archive" / "keras"
    run.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for r in range(2):   # 16 MiB a round: an 8 MiB kernel and its float mask
        with h5py.File(run / f"round_{r}.h5", "w") as f:
            f.attrs["layer_names"] = [b"prune_low_magnitude_fc"]
            g = f.create_group("prune_low_magnitude_fc")
            g.attrs["weight_names"] = [b"fc/kernel:0", b"prune_low_magnitude_fc/mask:0"]
            g["fc/kernel:0"] = rng.normal(size=(1024, 2048)).astype(np.float32)
            g["prune_low_magnitude_fc/mask:0"] = (rng.random((1024, 2048)) < 0.8 ** r).astype(np.float32)
    with file_server(tmp_path / "archive") as server:
        shown = run_cli("inspect", f"{server.url}/keras/", "--json").output
        assert '"fc.kernel"' in shown
        assert server.sent < 2 * 64 << 10, server.sent   # measured: 69,954 of 33,572,800 bytes
        local = analyze(run, tmp_path / "local")
        same_tables(analyze(f"{server.url}/keras/", tmp_path / "remote"), local)


def test_remote_orbax_inspect_reads_metadata_and_manifests_only(tmp_path):
    ts = pytest.importorskip("tensorstore")
    import json

    import numpy as np

    run = tmp_path / "archive" / "orbax"
    rng = np.random.default_rng(0)
    for step in (1, 2):   # an OCDBT store as orbax writes it: 8 MiB of weights and 8 MiB of masks
        folder = run / str(step)
        folder.mkdir(parents=True)
        tree = {}
        for name, value in {"params.w": rng.normal(size=(1024, 2048)).astype(np.float32),
                            "masks.w": (rng.random((1024, 2048)) < 0.8).astype(np.float32)}.items():
            keys = name.split(".")
            tree[str(tuple(keys))] = {"key_metadata": [{"key": k, "key_type": 2} for k in keys],
                                      "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
            spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": folder.as_uri() + "/"}, "path": name}
            store = ts.open(spec, create=True, shape=value.shape, dtype=ts.float32,
                            chunk_layout=ts.ChunkLayout(chunk_shape=[256, 2048])).result()
            store.write(value).result()
        (folder / "_METADATA").write_text(json.dumps({"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False}))
    with file_server(tmp_path / "archive") as server:
        assert '"w"' in run_cli("inspect", f"{server.url}/orbax/", "--json").output
        assert server.sent < 64 << 10, server.sent   # measured: 5,116 of 19,175,831 bytes
        local = analyze(run, tmp_path / "local")
        same_tables(analyze(f"{server.url}/orbax/", tmp_path / "remote"), local)


@pytest.mark.parametrize("archive", ["closed-form/safetensors", "open_lth/lottery_0123456789abcdef0123456789abcdef",
                                     "keras/closed-form-h5"])
def test_remote_scans_never_ask_above_the_url_given(tmp_path, archive):
    with file_server(FIXTURES) as server:
        run_cli("analyze", f"{server.url}/{archive}/", "-o", tmp_path / "out", "-q")
        run_cli("inspect", f"{server.url}/{archive}", "-q")
    above = [p for p in server.paths if not p.startswith(f"/{archive}/") and p != f"/{archive}"]
    assert server.paths and not above, above


@pytest.mark.parametrize("where", ["another port", "above the URL", "beside the URL", "another scheme"])
def test_a_redirect_that_leaves_the_url_given_is_refused_by_name(tmp_path, monkeypatch, where):
    import servers

    root = tmp_path / "archive"
    for run in ("runs/good", "runs/moved", "runsx/moved"):
        shutil.copytree(FIXTURES / "closed-form" / "safetensors", root / run)
    original = servers._Handler.do_GET
    targets = {}

    def redirect_one_file(self):
        if self.path == "/runs/moved/round_1.safetensors":
            self.send_response(302)
            self.send_header("Location", targets[where])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return original(self)

    monkeypatch.setattr(servers._Handler, "do_GET", redirect_one_file)
    monkeypatch.setattr(servers._Handler, "do_HEAD", redirect_one_file)
    with file_server(root) as real, file_server(root) as front:
        port = real.url.rsplit(":", 1)[1]
        targets.update({"another port": f"{real.url}/runs/moved/round_1.safetensors", "above the URL": "/secret",
                        "beside the URL": "/runsx/moved/round_1.safetensors",
                        "another scheme": f"https://127.0.0.1:{port}/runs/moved/round_1.safetensors"})
        result = run_cli("analyze", f"{front.url}/runs/", "-o", tmp_path / "out", "-q", expect=1)
    runs = pl.read_parquet(tmp_path / "out" / "runs.parquet")
    status, errors = dict(zip(runs["run"], runs["status"])), dict(zip(runs["run"], runs["error"]))
    assert status["good"] == "ok" and status["moved"] == "error", runs
    assert "round_1.safetensors redirects to" in errors["moved"] and "(not followed)" in errors["moved"], errors["moved"]
    assert "Traceback" not in result.output
    assert not real.paths or where != "another port", real.paths   # never asked


def test_a_redirect_below_the_url_given_is_followed(tmp_path):
    from flowscan.io.location import within

    assert within("http://h:8/a/b/c", "http://h:8/a/b/") and within("http://h/a/b", "http://h:80/a/b")
    assert not within("http://h:9/a/b/c", "http://h:8/a/b/") and not within("https://h:8/a/b/c", "http://h:8/a/b")
    assert not within("http://h:8/a/bc", "http://h:8/a/b") and not within("http://g:8/a/b/c", "http://h:8/a/b")
    assert not within("http://h:x/a/b", "http://h/a/b")
    root = tmp_path / "archive"
    shutil.copytree(FIXTURES / "closed-form" / "safetensors", root / "runs" / "good")
    with file_server(root) as server:   # http.server redirects a folder without its slash to one with it
        analyze(f"{server.url}/runs", tmp_path / "out")
        assert "/runs/good" in server.paths and "/runs/good/" in server.paths
