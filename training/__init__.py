"""BioCLIP-style contrastive training with open_clip (``treeprobe-train``).

Modules: :mod:`training.text` (captions from the taxonomy), :mod:`training.data`
(CSV / iNat21 / webdataset input), :mod:`training.shards` (``make-shards``),
:mod:`training.engine` (the DDP training loop), :mod:`training.checkpoint`
(atomic open_clip-format checkpoints), :mod:`training.evaluate` (tree agreement during
training), :mod:`training.cli` (the command line), :mod:`training.demo` (builds the bundled
demo checkpoint ``treeprobe/assets/demo_clip.pt``).
"""

from training.text import TEXT_TYPE_CHOICES, TEXT_TYPES, all_captions, make_caption, text_type_for_step

__all__ = ["TEXT_TYPES", "TEXT_TYPE_CHOICES", "make_caption", "all_captions", "text_type_for_step"]
