"""metrics.jsonl, TensorBoard events and the loss-curve PNG."""

import json

from megatron_jp.training.metrics import MetricsWriter, console_line

def test_each_logged_step_is_one_json_line_and_tensorboard_events_exist(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.log({"step": 1, "loss": 3.0, "lr": 1e-3})
    writer.log({"step": 2, "loss": 2.5, "lr": 1e-3, "valid_loss": 2.7, "valid_accuracy": 0.1})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "run", enabled=False)
    writer.log({"step": 1, "loss": 3.0})
    writer.close()
    assert not (tmp_path / "run").exists()


def test_console_line_shows_loss_speed_and_validation():
    line = console_line({"step": 5, "loss": 2.0, "tokens_per_second": 1500.0, "mfu": 0.25,
                         "valid_loss": 2.2, "valid_accuracy": 0.4}, 10)
    assert line.startswith("step 5/10") and "1,500 tok/s" in line and "MFU 25.0%" in line and "valid 2.2000" in line


def test_plot_writes_a_png_and_tolerates_a_partial_last_line(tmp_path, tool):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 11):
            f.write(json.dumps({"step": step, "loss": 10 / step, "tokens_per_second": 100.0}) + "\n")
        f.write('{"step": 11, "lo')
    assert tool("plot_metrics")([str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
