"""The README's Python examples run as written, from a folder other than the repository's."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)   # anywhere: the examples find the fixtures from the package
    for code in blocks:
        code = code.replace('Path("sigma-per-block")', f'Path({str(tmp_path / "sigma")!r})')
        exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "sigma.png").is_file() and (tmp_path / "sigma.svg").is_file()
