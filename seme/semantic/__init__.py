"""SeMe's semantic machinery (docs/method.md): bases from LM heads, cosine-to-probability mapping,
alignment of latent spaces, layer interpolation and vocabulary maps."""
