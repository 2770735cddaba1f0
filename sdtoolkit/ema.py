"""An exponential moving average of the UNet's weights, updated in place for all tensors at once.

diffusers' `EMAModel` updates shadow weights tensor by tensor, or with `foreach=True` through a temporary
copy of all the differences (a second UNet's worth of memory for a moment). `InPlaceEMAModel` keeps everything
else of `EMAModel` (decay schedule, saving, loading, store/restore) and does the update as one
`torch._foreach_lerp_`: shadow += (1 - decay) * (param - shadow), in place, no temporaries.

The shadow weights stay float32 when the trained ones are not: DeepSpeed's fp16 and bf16 modes hold the model
itself in half precision (its float32 master weights live in the optimizer). Those are averaged tensor by tensor,
each cast up on its own, so the temporaries stay one tensor's size.
"""

import torch
from diffusers.training_utils import EMAModel
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled


class InPlaceEMAModel(EMAModel):
    @torch.no_grad()
    def step(self, parameters):
        parameters = list(parameters)
        if is_deepspeed_zero3_enabled():
            return super().step(parameters)  # it gathers the partitioned parameters first

        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay

        trained = [(s, p) for s, p in zip(self.shadow_params, parameters) if p.requires_grad]
        frozen = [(s, p) for s, p in zip(self.shadow_params, parameters) if not p.requires_grad]
        if frozen:
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
        same = [(s, p) for s, p in trained if s.dtype == p.dtype]
        if same:
            torch._foreach_lerp_([s for s, _ in same], [p for _, p in same], 1 - decay)
        for s, p in trained:
            if s.dtype != p.dtype:
                s.lerp_(p.to(s.dtype), 1 - decay)
