"""Training: recipes (`recipes.RECIPES`, `get_recipe`), `config.TrainConfig`, `trainer.train`
and distillation (`distill.distill`). Import the submodules; nothing heavy loads here."""
