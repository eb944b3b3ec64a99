"""Mixin for [`PBSDTrainer`]: teacher samples served from a teacher-sample pool instead of sampled online."""

import logging

from datasets import Dataset

from ..trainer_checks import (
    named_datasets,
)


logger = logging.getLogger(__name__)


class TeacherPoolSamples:
    """Mixin of [`PBSDTrainer`]; reads the trainer's own attributes."""

    def use_teacher_pool(self, path: str, train_dataset=None, eval_dataset=None, warn_missing: bool = True) -> None:
        """Take the base teacher's samples from the pool at `path` (what `teacher_pool` does at construction).

        Refuses a pool drawn from other teacher weights, tokenizer, teacher prompt or sampling settings, or with fewer
        than `num_teacher_generations` samples per row. Batches with a row the pool lacks sample the teacher online
        (with vLLM, which cannot sample the base teacher, every row must be in the pool); `warn_missing=False` leaves
        out the warning that counts such training rows (for a pool of the rows a run visits, which says so itself).
        """
        from . import TeacherPool, pool_stamp, row_key

        args = self.args
        if args.teacher_model_kind != "base" or args.teacher_samples_from != "teacher":
            raise ValueError(
                "A teacher pool serves `teacher_model_kind='base'` with `teacher_samples_from='teacher'`."
            )
        pool = TeacherPool(path, stride=args.num_teacher_generations)
        pool.check(
            pool_stamp(self.teacher_weights_model(), self._tokenizer, args, self.eos_token_ids),
            args.num_teacher_generations,
        )
        train_dataset = self.train_dataset if train_dataset is None else train_dataset
        eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        column = args.privileged_context_column
        for name, dataset in named_datasets(train_dataset, eval_dataset):
            if not isinstance(dataset, Dataset):
                continue
            if self.use_vllm:  # vLLM cannot sample the base teacher online: every row must come from the pool
                pool.check_covers(dataset, column, name)
            elif name == "train_dataset" and warn_missing:
                missing = sum(
                    not pool.has(row_key(p, c)) for p, c in zip(dataset["prompt"], dataset[column], strict=True)
                )
                if missing:
                    logger.warning(
                        "The teacher pool at %s has no samples for %d of the %d rows of train_dataset: batches holding "
                        "such a row sample the teacher online.",
                        path,
                        missing,
                        len(dataset),
                    )
        args.teacher_pool = path
        self._teacher_pool = pool

    def _pool_serves(self, inputs) -> bool:
        if self._teacher_pool is None or self._is_agent:  # a multi-turn teacher rollout is not a stored completion
            return False
        from . import row_key

        column = self.args.privileged_context_column
        return all(self._teacher_pool.has(row_key(row["prompt"], row[column])) for row in inputs)

    def _teacher_samples_from_pool(self, inputs, teacher_prompts, teacher_rows, row_index, group_size):
        """(completion ids, decoded completions, teacher log-probs) of the teacher rows, taken from the pool."""
        from . import row_key

        column = self.args.privileged_context_column
        keys = [row_key(inputs[i]["prompt"], inputs[i][column]) for i in teacher_rows]
        global_rows = [int(row_index[i]) for i in teacher_rows]
        ids, logps = self._teacher_pool.draw(
            keys, [r % group_size for r in global_rows], [r // group_size for r in global_rows]
        )
        completions = self._decode_completions([teacher_prompts[i] for i in teacher_rows], ids)
        return ids, completions, logps
