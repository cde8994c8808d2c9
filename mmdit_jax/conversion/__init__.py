"""mmdit-convert's library side: find a source's components, write them as Orbax, export them back."""
from mmdit_jax.conversion.export import export
from mmdit_jax.conversion.to_orbax import convert

__all__ = ["convert", "export"]
