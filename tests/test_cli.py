"""The `nfsearch` command line: output, exit codes, one-line errors, no torch import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nfsearch.cli import main
from nfsearch.models import builtin_models

BOUND_ARGS = ["bound", "--model", "llama2-70b", "--gpu", "a100-80gb", "--tp", "8", "--peak-tflops", "260",
              "--json"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfsearch", *args], capture_output=True, text=True,
                          timeout=120)


def test_bound_json_in_process(capsys) -> None:
    assert main(BOUND_ARGS) == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object
    assert abs(out["optimal_tokens_per_s_per_gpu"] - 1857) / 1857 < 0.02
    assert out["binding"] == "compute" and out["peak_tflops"] == 260.0 and out["tp"] == 8
    assert out["workload"]["name"] == "splitwise" and out["dense_batch"] == 2048  # library defaults


def test_bound_json_subprocess() -> None:
    r = _run(*BOUND_ARGS)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert abs(out["optimal_tokens_per_s_per_gpu"] - 1857) / 1857 < 0.02
    assert out["binding"] == "compute"


def test_bound_text(capsys) -> None:
    assert main(["bound", "--model", "mixtral", "--gpu", "h200", "--tp", "2", "--workload", "const:500:100",
                 "--dense-batch", "1024", "--hbm-gbps", "4000"]) == 0
    out = capsys.readouterr().out
    assert "mixtral-8x7b" in out and "compute" in out and "tokens/s per GPU" in out
    assert "853 prefill tokens" in out  # 1024 * 500 / 600 rounded


def test_models_table(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + len(builtin_models())
    row = next(line for line in out if line.startswith("mixtral-8x7b")).split()
    assert row[1:4] == ["32", "4096", "8"] and float(row[-2]) == pytest.approx(46.7, rel=0.01)
    assert float(row[-1]) == pytest.approx(12.9, rel=0.01)
    assert main(["models", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["models"]) == len(builtin_models())


@pytest.mark.parametrize("args,needle", [
    (["--model", "llama9-70b", "--gpu", "h200"], "unknown model"),
    (["--model", "llama3-8b", "--gpu", "b200"], "unknown GPU"),
    (["--model", "llama3-8b", "--gpu", "h200", "--tp", "3"], "tp 3 does not divide 32 heads"),
    (["--model", "llama3-8b", "--gpu", "h200", "--dense-batch", "-5"], "dense_batch"),
    (["--model", "llama3-8b", "--gpu", "h200", "--workload", "const:1"], "const:IN:OUT"),
    (["--model", "llama3-8b", "--gpu", "h200", "--peak-tflops", "-1"], "peak_tflops"),
    (["--model", "llama2-70b", "--gpu", "a100-80gb"], "raise --tp"),
])
def test_bad_input_exit_2_one_line(capsys, args, needle) -> None:
    assert main(["bound", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nfsearch: error: ") and needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_malformed_config_json(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n "hidden_size": }')
    assert main(["bound", "--model", str(tmp_path), "--gpu", "h200"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nfsearch: error: ") and "malformed" in err and err.count("\n") == 1


def test_hf_config_model_runs(tmp_path, capsys) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 512, "num_hidden_layers": 4,
           "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1024, "vocab_size": 1000}
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["bound", "--model", str(folder), "--gpu", "h100-sxm", "--tp", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "my-llama"


def test_argparse_errors_exit_2(capsys) -> None:
    assert main(["bound", "--gpu", "h200"]) == 2  # missing --model
    assert main(["bound", "--model", "x", "--gpu", "h200", "--tp", "two"]) == 2
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_subprocess_error_has_no_traceback() -> None:
    r = _run("bound", "--model", "llama3-8b", "--gpu", "h200", "--tp", "3")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["nfsearch: error: tp 3 does not divide 32 heads of model "
                                             "'llama3-8b'"]


def test_cli_does_not_import_torch() -> None:
    code = ("import sys, nfsearch.cli; nfsearch.cli.build_parser(); "
            "from nfsearch import bound, opgraph, workload; "
            "print(sorted(m for m in ('torch', 'pandas', 'triton') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
