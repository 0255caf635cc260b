"""Replica start-up: skip Ray's model-download step for models that are already on disk.

Before its engine starts, every `ray.serve.llm` replica runs a Ray task on each node of its
placement group to fetch the model from a cloud mirror (s3://, gs://, ...). For a local
directory (a registry entry, the bundled tiny model, a mounted volume) that task downloads
nothing, yet it is a fresh worker process importing Ray's LLM stack and torch: about 10 s of each
replica start on 2 cores. Ray leaves the step to a callback (`LLMConfig.callback_config`); this
one turns it off for local directories and keeps it for everything else.
"""

from __future__ import annotations

import os

from ray.llm._internal.common.callbacks.base import CallbackBase


class SkipDownloadForLocalModels(CallbackBase):
    """`callback_config.callback_class` of every LLMConfig attune builds."""

    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        if isinstance(source, str) and os.path.isdir(source):
            self.ctx.run_init_node = False
            # The one other thing the skipped task did: torch cannot create this folder itself
            # where its parent is missing (Ray's workaround in download_model_files).
            import torch

            os.makedirs(os.path.join(torch.hub._get_torch_home(), "kernels"), exist_ok=True)
