"""Zeroes or refills the weights of a TorchScript module, keeping its graph.

The GPU check carries MiniLM's traced graph (the transformer issue's embedding model) to a
machine it cannot download to, inside a 64 MiB bundle: zeroed, its 91 MB of weights compress to
almost nothing. There it is refilled with seeded random weights (LayerNorm weights 1, biases 0,
the rest N(0, 0.02), as transformers initialises BERT), which run exactly the same kernels at
the same speed; the check compares the GPU's answers with the CPU's on the same weights.

Usage: python3 weights.py zero|fill MODEL.pt
"""
import sys

import torch


def main() -> int:
    mode, path = sys.argv[1], sys.argv[2]
    module = torch.jit.load(path, map_location="cpu")
    generator = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if mode == "zero":
                p.zero_()
            elif "LayerNorm.weight" in name or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    module.save(path)
    print(f"{mode}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
