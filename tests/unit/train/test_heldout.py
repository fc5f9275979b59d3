"""When sae-train's held-out evaluation runs at all (`evals_due`: a step that is a multiple of
trainer.eval_every_steps inside the run), and the options refused by name."""

import pytest

from sae_dist.train.config import TrainerConfig
from sae_dist.train.heldout import evals_due


@pytest.mark.parametrize(("every", "tokens", "max_steps", "due"), [
    (10, 1000, None, True),  # 10 steps: step 10 is the last
    (11, 1000, None, False),
    (0, 1000, None, False),  # off
    (5, 1000, 4, False),  # stopped at step 4 (trainer.max_steps)
    (4, 1000, 4, True),
    (1, 50, None, True),  # a run shorter than one batch still makes one step
])
def test_an_evaluation_is_due_when_its_step_is_inside_the_run(every, tokens, max_steps, due):
    assert evals_due(TrainerConfig(tokens=tokens, batch_tokens=100, eval_every_steps=every,
                                   max_steps=max_steps)) is due


@pytest.mark.parametrize(("kw", "msg"), [({"eval_every_steps": -1}, "trainer.eval_every_steps=-1 must be >= 0"),
                                         ({"eval_contexts": 0}, "trainer.eval_contexts=0 >= 1")])
def test_bad_options_are_refused_by_name(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainerConfig(**kw)
