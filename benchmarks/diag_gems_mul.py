"""Which ``mul`` calls FlagGems 5.0.2 gets wrong on CUDA (the probe found NaN logits).

Runs each multiplication a Qwen2 forward pass makes, natively and with only FlagGems'
``mul`` enabled, and prints whether the results agree.  Usage: ``python benchmarks/diag_gems_mul.py``.
"""

from __future__ import annotations

import json

import flag_gems
import torch


def main() -> None:
    """Print one JSON line per case."""
    torch.manual_seed(0)
    d, bf = "cuda", torch.bfloat16
    x = torch.randn(2, 16, 64, device=d, dtype=bf)
    xf = x.float()
    cases = {
        "bf16 * python float (wrapped CPU scalar)": lambda: x * 1.0,
        "fp32 * python float": lambda: xf * 0.5,
        "bf16 * 0-dim CPU tensor": lambda: x * torch.tensor(2.0),
        "bf16 * 0-dim CUDA tensor": lambda: x * torch.tensor(2.0, device=d),
        "bf16 * bf16 same shape": lambda: x * x,
        "fp32 [2,16,64] * fp32 [2,16,1] (rms norm)": lambda: xf * xf.pow(2).mean(-1, keepdim=True),
        "bf16 weight [64] * bf16 [2,16,64]": lambda: torch.ones(64, device=d, dtype=bf) * x,
        "fp32 cos [1,16,64] * python float (rotary attention_scaling)": lambda: xf[:1].cos() * 1.0,
        "bf16 [2,4,16,16] * bf16 [2,1,16,16] (q * cos)": lambda: (
            torch.randn(2, 4, 16, 16, device=d, dtype=bf) * torch.randn(2, 1, 16, 16, device=d, dtype=bf)
        ),
        "non-contiguous (transposed) bf16 * bf16": lambda: x.transpose(1, 2) * x.transpose(1, 2),
    }
    for name, fn in cases.items():
        torch.manual_seed(1)
        ref = fn()
        torch.manual_seed(1)
        try:
            # flag_gems.use_gems leaves its kernels registered on torch >= 2.10 (it compares
            # version strings), so register into a private library and destroy it here.
            lib = torch.library.Library("aten", "IMPL")
            flag_gems.only_enable(lib=lib, include=["mul"])
            try:
                got = fn()
                torch.cuda.synchronize()
            finally:
                lib._destroy()
            same = bool(torch.equal(ref, got))
            nonfinite = int((~torch.isfinite(got)).sum())
            err = float((ref.float() - got.float()).abs().nan_to_num(float("inf")).max())
            print(json.dumps({"case": name, "identical": same, "nonfinite": nonfinite, "max_abs_err": err}))
        except Exception as exc:  # a diagnostic reports whatever FlagGems raises
            print(json.dumps({"case": name, "error": f"{type(exc).__name__}: {exc}"[:300]}))


if __name__ == "__main__":
    main()
