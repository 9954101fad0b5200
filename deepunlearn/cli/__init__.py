"""The ``deepunlearn`` command (also ``python -m deepunlearn``).

Subcommands::

    deepunlearn forget   --arch vit_b_16 --weights vit.pth --data imagenet/train --forget 7 --out vit-7.pth
    deepunlearn evaluate --arch vit_b_16 --weights vit-7.pth --data imagenet/val --forget 7
    deepunlearn stats build --arch vit_b_16 --weights vit.pth --data imagenet/train --per-class 10 --out stats.pt
    deepunlearn forget   --arch vit_b_16 --weights vit.pth --stats stats.pt --forget 7 --out vit-7.pth
    deepunlearn stats show stats.pt
    deepunlearn suite --quick

Models are a torchvision or timm architecture plus a state dict in a torch file or safetensors
(``--arch`` or ``--timm``, ``--weights``) or a whole pickled module (``--model``); the edited
model is written the same way, with a JSON report next to it. Under ``torchrun`` the statistics are collected data-parallel and rank 0 writes.
"""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
