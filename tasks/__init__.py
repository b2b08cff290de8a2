"""cloudbake's doit task definitions: what each task declares, over the engine in the cloudbake package.

The same modules serve the repository's dodo.py (as ``tasks``) and the installed ``cloudbake``
command (the wheel maps this folder to ``cloudbake.tasks``); they import each other relatively.
"""
