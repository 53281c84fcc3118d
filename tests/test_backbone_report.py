"""Notebook 00's report (`metabolic.report.backbone_figures`) on the committed cpu run's pretraining metrics."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from metabolic.core.config import from_dict
from metabolic.report import backbone_figures

RUN = next((Path(__file__).resolve().parents[1] / "results" / "budgets").glob("cpu-*"))
METRICS = [json.loads(line) for line in (RUN / "pretrain_metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _backbone(pretrained_here: bool = True):
    """The fields of `pipeline.pretrain.BackboneData` the report reads, holding the committed run's metrics."""
    return SimpleNamespace(path=str(RUN), pretrained_here=pretrained_here, metrics=METRICS if pretrained_here else [])


def test_the_curve_plots_every_evaluation_on_its_axes():
    fig = backbone_figures.pretrain_curve(METRICS, "cpu")
    steps = [r["step"] for r in METRICS]
    assert [t.name for t in fig.data] == ["train loss (nats/token)", "validation loss (nats/token)", "validation perplexity"]
    for trace, key in zip(fig.data, ("train_loss", "val_loss", "val_ppl")):
        assert list(trace.x) == steps and list(trace.y) == [r[key] for r in METRICS]
    assert [t.yaxis or "y" for t in fig.data] == ["y", "y", "y2"]  # perplexity on the secondary axis
    assert (fig.layout.yaxis.title.text, fig.layout.yaxis2.title.text, fig.layout.yaxis2.type) == (
        "loss (nats/token)", "perplexity", "log")
    assert fig.layout.title.text == "Backbone pretraining (cpu)" and fig.layout.xaxis.title.text == "optimiser step"


def test_the_summary_prints_the_corpus_and_each_evaluation():
    data = SimpleNamespace(source="assets", train_ids=[[1, 2, 3], [4, 5]], valid_ids=[[6]])
    lines = backbone_figures.summary(data, _backbone())
    assert lines[:5] == ["WikiText-2 source: assets; texts: train 2, validation 1", "training tokens (GPT-2 BPE): 5",
                         "backbone: pretrained here", "step   250  train loss 7.151  val loss 5.632  val ppl 279.1",
                         "step   500  train loss 6.104  val loss 5.499  val ppl 244.4"]
    assert len(lines) == 3 + len(METRICS)
    assert backbone_figures.summary(data, _backbone(False))[2] == f"backbone: from {RUN}"


def test_the_conclusion_states_the_run_from_its_config_and_last_evaluation():
    cfg = from_dict(json.loads((RUN / "study_config.json").read_text(encoding="utf-8")))
    assert backbone_figures.conclusion(_backbone(), cfg, "cpu run") == (
        "On the cpu run, a GPT-2 of 2 layers x 128 was trained for 2345 steps (2,401,280 tokens) and reached validation "
        "perplexity 172.6 on 64 validation blocks of 128 tokens. It is saved at data/cpu/backbone/ and loads with "
        "from_pretrained.")
    assert backbone_figures.conclusion(_backbone(False), cfg, "cpu run") == (
        f"On the cpu run, the backbone is {str(RUN)!r} from the Hub or a folder; nothing was trained here.")
