"""The Colab quickstart runs top to bottom (its code cells, in one namespace)."""

import json
import os

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "colab", "quickstart.ipynb")


def test_quickstart_notebook_runs(capsys):
  with open(NOTEBOOK) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  namespace: dict = {}
  for cell in cells:
    source = "".join(l for l in cell["source"] if not l.lstrip().startswith(("!", "%")))
    exec(compile(source, NOTEBOOK, "exec"), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "QuantDot" in out and "w_step" in out
