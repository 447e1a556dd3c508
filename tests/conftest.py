"""Shared test settings: tiny tensors on a 2-core machine run fastest on one thread (more only spin)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
