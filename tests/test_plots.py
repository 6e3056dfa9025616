"""trainer.plots: the loss series both the training plots and the ibc-run report draw."""

from trainer.plots import DEFAULT_PARTS, loss_series, plot_metrics


def test_loss_series_draws_each_reported_part_and_a_part_equal_to_the_total_once(tmp_path):
    records = [{"epoch": 1, "loss": 3.0, "loss_margin": 3.0, "loss_nll": 1.0},
               {"epoch": 2, "loss": 2.0, "loss_margin": 2.0, "loss_nll": None}]
    s = loss_series(records, {"loss_margin": "margin loss", "loss_nll": "NLL", "loss_x": "never logged"})
    assert s == {"loss": ("total", [(1, 3.0), (2, 2.0)]), "loss_nll": ("NLL", [(1, 1.0)])}
    # runs logged before methods named their parts: IBC's two cross-entropies
    old = [{"epoch": 1, "loss": 2.0, "loss_backbone": 1.5, "loss_mpn": 0.5}]
    assert [label for label, _ in loss_series(old).values()] == ["total", *DEFAULT_PARTS.values()]
    written = plot_metrics(records, str(tmp_path), parts={"loss_margin": "margin loss"})
    assert [p.rsplit("/", 1)[1] for p in written] == ["loss.png"]  # no recall key logged: no recall plot
    assert (tmp_path / "loss.png").stat().st_size > 1000
