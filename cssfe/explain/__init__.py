"""Visual explanations: the model's own class activation maps, Grad-CAM, the pointing game."""
from cssfe.explain.maps import class_maps, gradcam
from cssfe.explain.pointing import pointing_game

__all__ = ["class_maps", "gradcam", "pointing_game"]
