"""The benchmark's workload: a small GPT-2 (random init) learning generated token data.

Imported by the plain DeepSpeed script and executed in the kernel before the %%bigtrain
cell, so that both sides build exactly the same model and data. `--gpu` uses the GPU-sized
one: a 124M-parameter GPT-2 (GPT-2 small's shape) on 1024-token sequences.
"""

import torch

SEQ_LEN = 64
VOCAB = 256
SAMPLES = 2048


class TokenData(torch.utils.data.Dataset):
    """Sequences from a fixed random bigram chain, so that there is something to learn."""

    def __init__(self, n: int = SAMPLES, seed: int = 1, seq_len: int = SEQ_LEN, vocab: int = VOCAB):
        g = torch.Generator().manual_seed(seed)
        table = torch.randint(0, vocab, (vocab, 4), generator=g)
        start = torch.randint(0, vocab, (n,), generator=g)
        choice = torch.randint(0, 4, (n, seq_len), generator=g)
        ids = torch.empty(n, seq_len, dtype=torch.long)
        ids[:, 0] = start
        for t in range(1, seq_len):
            ids[:, t] = table[ids[:, t - 1], choice[:, t]]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_model() -> torch.nn.Module:
    """Return a 2-layer GPT-2 (about 0.5M parameters), randomly initialised."""
    from transformers import GPT2Config, GPT2LMHeadModel

    # No dropout: both sides must compute the same losses, whatever RNG draws they make.
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=128, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


# The GPU-sized workload (launch_overhead.py --gpu): GPT-2 small's shape and vocabulary.
GPU_SEQ_LEN = 1024
GPU_VOCAB = 50257
GPU_SAMPLES = 1024


class GpuTokenData(TokenData):
    """The same bigram chain, as 1024-token sequences over GPT-2's vocabulary."""

    def __init__(self, n: int = GPU_SAMPLES, seed: int = 1):
        super().__init__(n, seed, seq_len=GPU_SEQ_LEN, vocab=GPU_VOCAB)


def make_gpu_model() -> torch.nn.Module:
    """Return a 12-layer GPT-2 (124M parameters, GPT-2 small's shape), randomly initialised, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=GPU_VOCAB, n_positions=GPU_SEQ_LEN, n_embd=768, n_layer=12, n_head=12,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)
