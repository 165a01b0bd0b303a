"""The README's Python examples run as written: the quick start, then the offline serving engine on its model
(the OpenAI-client example runs against a live server in tests/serving/test_api.py)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md has no ```python block"
    # The example writes to /tmp/longcat-tiny; the test keeps that inside its own folder.
    code = blocks[0].replace("/tmp/longcat-tiny", str(tmp_path / "longcat-tiny"))
    monkeypatch.chdir(tmp_path)
    names = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), names)
    assert names["logits"].shape == (1, 1, 384)  # one decode step's logits over the padded vocabulary
    assert names["cfg"].vocab_size == 384 and (tmp_path / "longcat-tiny" / "config.json").exists()
    engine_block = next(b for b in blocks if "Engine(" in b)
    exec(compile(engine_block, "README.md", "exec"), names)
    assert names["out"].finish_reason in ("stop", "length") and names["engine"].stats().kv_pages_used == 0
