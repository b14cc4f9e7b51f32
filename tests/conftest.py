"""Test session set-up: the suite is sized for 2 CPU threads (the CI machines)."""
import torch

torch.set_num_threads(2)
