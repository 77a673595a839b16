"""The report file's one owner (safegen/report_file.py): each sample written once, whatever is sent
twice or out of order, and the finished file in sample order."""
import json

import pytest

from safegen.report_file import ReportFile


def record(i, s, text="t"):
    return {"prompt_index": i, "line": i + 1, "sample": s, "text": text, "toxic_before": False, "toxic_after": False,
            "refined": False, "toxicity_before": {"aggregate": 0.0}, "toxicity_after": {"aggregate": 0.0},
            "rows": 1.0, "rows_before": 0.0, "reward_calls": 0.0, "seconds": 0.0}


def keys(path):
    return [(r["prompt_index"], r["sample"]) for r in map(json.loads, path.read_text().splitlines())]


def test_duplicates_are_written_once_and_the_file_ends_in_sample_order(tmp_path):
    out = tmp_path / "o.jsonl"
    with ReportFile(out, {"x": 1}, prompts=3, samples=2) as report:
        assert report.write([record(2, 1), record(0, 0)]) == 2
        assert report.write([record(0, 0, "again"), record(1, 0), record(2, 1)]) == 1  # a batch run twice
        summary = report.finish()
    assert keys(out) == [(0, 0), (1, 0), (2, 1)]  # put in order at the end
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == ["t"] * 3  # the first copy
    assert summary.samples == 3
    # A rerun (a driver killed and started again) knows what is written and adds only the rest.
    with ReportFile(out, {"x": 1}, prompts=3, samples=2) as report:
        report.open()
        assert (2, 1) in report.done and (1, 1) not in report.done
        assert report.write([record(i, s) for i in range(3) for s in range(2)]) == 3
        report.finish()
    assert keys(out) == [(i, s) for i in range(3) for s in range(2)]


def test_another_configuration_is_refused(tmp_path):
    from safegen.prompts import InputError

    out = tmp_path / "o.jsonl"
    with ReportFile(out, {"x": 1}, prompts=1, samples=1) as report:
        report.write([record(0, 0)])
        report.finish()
    with pytest.raises(InputError, match="another configuration"):
        with ReportFile(out, {"x": 2}, prompts=1, samples=1):
            pass
