"""BioCLIP-style contrastive training with open_clip (``treeprobe train``, alias ``treeprobe-train``).

Modules: :mod:`treeprobe.training.text` (captions from the taxonomy), :mod:`treeprobe.training.data`
(CSV / iNat21 / webdataset input), :mod:`treeprobe.training.shards` (``make-shards``),
:mod:`treeprobe.training.engine` (the DDP training loop), :mod:`treeprobe.training.checkpoint`
(atomic open_clip-format checkpoints), :mod:`treeprobe.training.evaluate` (tree agreement during
training), :mod:`treeprobe.training.cli` (the commands), :mod:`treeprobe.training.demo` (builds the
bundled demo checkpoint ``treeprobe/assets/demo_clip.pt``). Models come from
:func:`treeprobe.models.create_model`, the factory analysis uses too.
"""

from treeprobe.training.text import TEXT_TYPE_CHOICES, TEXT_TYPES, all_captions, make_caption, text_type_for_step

__all__ = ["TEXT_TYPES", "TEXT_TYPE_CHOICES", "make_caption", "all_captions", "text_type_for_step"]
