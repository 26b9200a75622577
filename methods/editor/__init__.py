"""``lora-editor``: Emirdagi et al., "Leveraging Image Editing Foundation Models for Data-Efficient CT Metal Artifact
Reduction" (arXiv 2604.05934), the LoRA image editor on Qwen-Image-Edit, registered as ``lora-editor``
(``method.LoRAEditor``) with the rows of its Tables 1-4.

Modules, one concept each: ``conditioning`` (the 8-bit window representation, the ``none`` / ``multi`` / ``grid``
conditionings and their prompts, reference choice), ``instruction`` (the Qwen2.5-VL instruction encoder and its
offline tiny stand-in), ``backbone`` (the diffusers MMDiT and VAE: latents, velocity, flow-matching loss, sampling),
``standin`` (the small pre-trained backbone of the CPU benchmark) and ``method`` (LoRA, training, self-ensembling,
the rows).
"""
from .backbone import BACKBONES, LORA_TARGET_MODULES, EditorBackbone, build_backbone, load_backbone
from .conditioning import MODES, PROMPTS, WINDOW_HU, condition_images, grid_image, hu_to_rgb, rgb_to_hu
from .method import OUTPUTS, SCALES, LoRAEditor

__all__ = ["BACKBONES", "LORA_TARGET_MODULES", "MODES", "OUTPUTS", "PROMPTS", "SCALES", "WINDOW_HU",
           "EditorBackbone", "LoRAEditor", "build_backbone", "condition_images", "grid_image", "hu_to_rgb",
           "load_backbone", "rgb_to_hu"]
