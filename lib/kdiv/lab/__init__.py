"""What the notebooks use: toy teachers and the vectorised fitting loop (:mod:`.toy`), Gaussian fits
(:mod:`.gaussian`), the outlier study (:mod:`.outliers`), the loss zoo (:mod:`.zoo`), closed-form gradient
coefficients (:mod:`.gradients`), the ipywidgets explorer (:mod:`.explorer`) and the one figure style
(:mod:`.plotting`).

Needs the ``notebooks`` extra (``pip install "kdiv[notebooks]"``: matplotlib, imageio, ipywidgets); the core
(``import kdiv``) never imports this package.
"""
