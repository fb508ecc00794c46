"""The Colab notebooks run top to bottom (their code cells, in one namespace)."""

import json
import os

import pytest

COLAB = os.path.join(os.path.dirname(os.path.dirname(__file__)), "colab")

# notebook -> text its printed output must contain
EXPECT = {
    "quickstart.ipynb": ("QuantDot", "w_step"),
    "compile_for_tpu.ipynb": ("v4 int8 kernels in the program: 1",
                              "v6e int8 kernels in the program: 1", "v5e:2x2 (4 devices)",
                              "jaxcomp kernels: 14", "fits: True"),
    "bring_your_own_model.ipynb": ("stacked: blocks/down x4", "left in float, not supported",
                                   "blocks[1]/up", "restored == packed: True", "layers[1]/up",
                                   "linen restored == packed: True"),
    "pipeline_and_evaluation.ipynb": ("p_q stages: prune,gptq,convert,eval",
                                      "resumed report equal: True", "refused: stage 3 (eval)",
                                      "| p_q |", "quality_vs_size.png"),
    "mixed_precision_search.ipynb": ("layers scored: 14", "budget 3.5 -> bits/param:",
                                     "wrote allocation.png", "ranks: kept fraction",
                                     "OWL sparsities from"),
    "formats_rotations_export.ipynb": ("E2M1 values:", "mxfp4: rel. logit error",
                                       "4.250 bits/weight, packed == fake-quant: True",
                                       "nvfp4: rel. logit error", "W8A8 e4m3 rel. logit error",
                                       "W4A4 logit MSE", "GPTQ round trip bit-exact: True"),
    "calibration_sources.ipynb": ("{'train': 6, 'other': 2, 'self': 2}",
                                  "calibration set: (8, 32)", "cached self-generated files: 1",
                                  "in-domain ppl", "out-of-domain ppl"),
}


def test_every_notebook_is_listed():
  assert sorted(f for f in os.listdir(COLAB) if f.endswith(".ipynb")) == sorted(EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_notebook_runs(name, capsys):
  path = os.path.join(COLAB, name)
  with open(path) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  namespace: dict = {}
  for cell in cells:
    source = "".join(l for l in cell["source"] if not l.lstrip().startswith(("!", "%")))
    exec(compile(source, path, "exec"), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  for text in EXPECT[name]:
    assert text in out, text
