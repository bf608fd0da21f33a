"""The test oracle for completion log-probs: one full row per completion, a loop over rows.

Nothing is shared: each completion runs with its own copy of the prompt (video spliced in, no
padding), the LLM's plain forward gives the hidden states, and the head is a float64 matmul over
the whole vocabulary with a float64 log-softmax. Production (`tinyr1.logprobs`) shares the prompt
across a group's rows, pads prompts, checkpoints layers itself and tiles the vocabulary; it must
agree with this.
"""

from __future__ import annotations

import torch

from tinyr1.model.tinyllava import TinyLlavaVideo
from tinyr1.rollout import Rollout


def naive_logprobs(
    model: TinyLlavaVideo, ro: Rollout, rows: torch.Tensor, *, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p [n, L], entropy [n, L]) in float64 of the completions `rows` of `ro`.

    Video tokens: re-run through the connector (per row) when grad is enabled and it trains, as
    the update does; the rollout's otherwise.
    """
    weight = model.llm.get_output_embeddings().weight.double()  # [V, D]
    logps, ents = [], []
    for i in rows.tolist():
        p = int(ro.row_prompt[i])
        video = model.connect(ro.features[p]) if torch.is_grad_enabled() and model.connector_trains else ro.video_tokens[p]
        comp = ro.completion_ids[i]  # [L]
        embeds, mask, _ = model.splice([torch.cat([ro.prompt_ids[p], comp])], [video])  # [1, S, D]
        hidden = model.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[0]  # [S, D]
        start = ro.prompt_ids[p].numel() - 1 + video.shape[0] - 1  # the state predicting completion token 0
        logits = hidden[start : start + comp.numel()].double() @ weight.T / temperature  # [L, V]
        logp = logits.log_softmax(-1)  # [L, V]
        logps.append(logp.gather(1, comp[:, None])[:, 0])
        ents.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(logps), torch.stack(ents)
