"""Figures and summaries of notebook 00 (the GPT-2 backbone pretrained on WikiText-2): the corpus and the
evaluation rows of pretraining, the loss and perplexity curve, and the run's conclusion.

Each function reads only the corpus and the backbone stage's results (`metabolic.pipeline.corpus.CorpusData`,
`metabolic.pipeline.pretrain.BackboneData`: its `path`, `pretrained_here` and per-evaluation `metrics`)
and returns text or a plotly figure.
"""

from __future__ import annotations

from typing import Any, Sequence

from metabolic.core.config import StudyConfig


def summary(data, backbone) -> list[str]:
    """The corpus (source, texts and tokens per split) and the backbone: where it came from and each
    evaluation of its pretraining (step, train and validation loss, validation perplexity)."""
    lines = [f"WikiText-2 source: {data.source}; texts: train {len(data.train_ids):,}, validation {len(data.valid_ids):,}",
             f"training tokens (GPT-2 BPE): {sum(map(len, data.train_ids)):,}",
             f"backbone: {'pretrained here' if backbone.pretrained_here else 'from ' + backbone.path}"]
    lines += [f"step {row['step']:>5}  train loss {row['train_loss']:.3f}  val loss {row['val_loss']:.3f}  "
              f"val ppl {row['val_ppl']:.1f}" for row in backbone.metrics]
    return lines


def pretrain_curve(metrics: Sequence[dict[str, Any]], profile: str):
    """Train and validation loss (nats/token, left axis) and validation perplexity (log, right axis) per
    optimiser step of the backbone's pretraining."""
    from plotly.subplots import make_subplots

    steps = [r["step"] for r in metrics]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=steps, y=[r["train_loss"] for r in metrics], name="train loss (nats/token)")
    fig.add_scatter(x=steps, y=[r["val_loss"] for r in metrics], name="validation loss (nats/token)")
    fig.add_scatter(x=steps, y=[r["val_ppl"] for r in metrics], name="validation perplexity", secondary_y=True,
                    line={"dash": "dot"})
    fig.update_layout(title=f"Backbone pretraining ({profile})", xaxis_title="optimiser step")
    fig.update_yaxes(title_text="loss (nats/token)", secondary_y=False)
    fig.update_yaxes(title_text="perplexity", type="log", secondary_y=True)
    return fig


def conclusion(backbone, cfg: StudyConfig, run_label: str) -> str:
    """Notebook 00's "What this run shows": the architecture, steps, tokens and final validation perplexity
    of a backbone pretrained here, or where a pretrained one came from."""
    if not backbone.pretrained_here:
        return f"On the {run_label}, the backbone is {backbone.path!r} from the Hub or a folder; nothing was trained here."
    last, arch = backbone.metrics[-1], cfg.backbone
    return (f"On the {run_label}, a GPT-2 of {arch.n_layer} layers x {arch.n_embd} was trained for {last['step']} steps "
            f"({last['tokens_seen']:,} tokens) and reached validation perplexity {last['val_ppl']:.1f} on "
            f"{arch.max_eval_blocks} validation blocks of {arch.block_size} tokens. It is saved at "
            f"data/{cfg.profile}/backbone/ and loads with from_pretrained.")
