"""Jupyter settings for the collection's notebooks, read by `make figures` (nbconvert) and `make lab` (JupyterLab).

What a notebook file stores is the same whichever of the two wrote it: the outputs, one kernelspec (python3, the
name JupyterLab opens without asking for a kernel) and the language's name; nothing that depends on the machine or
the run (Python version, widget state, timings). `make figures` strips the rest after executing; JupyterLab strips it
on every save (a pre-save hook), so that opening a notebook, running it and saving it leaves git clean.

Kernels are reached with CurveZMQ encryption (keys made by the kernel manager, which ipykernel's kernelspec
declares it supports): the kernel then has nothing to warn about ("Kernel is running over TCP without encryption").
"""

from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from nbconvert.preprocessors import ClearMetadataPreprocessor, Preprocessor

c = get_config()  # noqa: F821 (defined by traitlets when it loads this file)

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
# key paths of the notebook metadata that are kept; everything else goes
KEEP = {"kernelspec", ("language_info", "name")}


class StoreKernelspec(Preprocessor):
    """Store the collection's kernelspec in the notebook (after execution, as the last step)."""

    def preprocess(self, nb, resources):
        nb.metadata["kernelspec"] = dict(KERNELSPEC)
        return nb, resources


def scrub(model, **kwargs):
    """JupyterLab's pre-save hook: keep what `make figures` keeps. The cells' "trusted" flags stay for the server,
    which reads them to sign the notebook and removes them before writing."""
    if model.get("type") != "notebook":
        return
    import nbformat

    nb = nbformat.from_dict(model["content"])
    ClearMetadataPreprocessor(preserve_nb_metadata_mask=KEEP, preserve_cell_metadata_mask={"trusted"}).preprocess(
        nb, {}
    )
    StoreKernelspec().preprocess(nb, {})
    model["content"] = nb


class CollectionContents(AsyncLargeFileManager):
    """JupyterLab's default contents manager, with :func:`scrub` registered as a pre-save hook. (Registered here,
    not through the ``pre_save_hook`` setting: the server applies its configuration twice and would warn that the
    hook overrides itself.)"""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_pre_save_hook(scrub)


# ---- make figures: jupyter nbconvert --to notebook --execute --inplace
c.ExecutePreprocessor.kernel_name = KERNELSPEC["name"]
c.ExecutePreprocessor.timeout = 600
c.ClearMetadataPreprocessor.enabled = True
c.ClearMetadataPreprocessor.preserve_nb_metadata_mask = KEEP
# Merging split streams after execution: a busy machine can split one print into several stream outputs, and
# merging them keeps the stored bytes the same from run to run.
c.NotebookExporter.preprocessors = ["nbconvert.preprocessors.CoalesceStreamsPreprocessor", StoreKernelspec]

# ---- make lab
c.ServerApp.contents_manager_class = CollectionContents

# ---- both
c.KernelManager.transport_encryption = "auto"
