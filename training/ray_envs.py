"""A gymnasium vector env whose sub-envs live in Ray actors (rollouts on a Ray cluster).

``RayVectorEnv(env_fns, address=...)`` is a drop-in for ``gym.vector.SyncVectorEnv(env_fns,
autoreset_mode=AutoresetMode.SAME_STEP)``: the same observations, rewards, terminations and
info dicts (``final_obs`` / ``final_info`` and their ``_`` masks on an autoreset step), so
``training.ppo`` consumes either unchanged. Each sub-env runs in its own actor, which steps the
env and, when an episode ends, resets it at once (SAME_STEP autoreset); the driver sends every
action, gathers all results with one ``ray.get`` and batches them with gymnasium's own helpers.

``address``: ``"local"`` starts a private local Ray instance (2 CPUs, no dashboard) that
``close()`` shuts down again; anything else (``"auto"``, ``"ray://host:10001"``, ...) goes to
``ray.init(address=...)`` and joins an existing cluster. If Ray is already initialised in this
process, that instance is used as it is and left running. On a remote cluster the workers must
be able to import ``training`` (install faasrm there, or pass a ``runtime_env`` to your own
``ray.init`` before building the env).

Ray is imported lazily: this module imports without it (``pip install 'faasrm[ray]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

LOCAL = "local"
"""``address`` value that starts a local Ray instance owned by the vector env."""


class EnvWorker:
    """One sub-env; instantiated as a Ray actor (``ray.remote(EnvWorker)``)."""

    def __init__(self, env_fn: Callable[[], gym.Env]) -> None:
        self.env = env_fn()

    def spaces(self) -> tuple[gym.Space, gym.Space, dict[str, Any], str | None]:
        env = self.env
        return env.observation_space, env.action_space, dict(env.metadata), env.render_mode

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None):
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any):
        """Step; when the episode ends, reset at once and return the new episode's first
        observation with ``info = {"final_obs", "final_info", **reset_info}`` (SAME_STEP)."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            final = {"final_obs": obs, "final_info": info}
            obs, reset_info = self.env.reset()
            info = {**final, **reset_info}
        return obs, float(reward), bool(terminated), bool(truncated), info

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        attr = self.env.get_wrapper_attr(name)
        return attr(*args, **kwargs) if callable(attr) else attr

    def set_attr(self, name: str, value: Any) -> None:
        self.env.set_wrapper_attr(name, value)

    def close(self) -> None:
        self.env.close()


class RayVectorEnv(gym.vector.VectorEnv):
    """Vector env over Ray actors; SAME_STEP autoreset only (see the module docstring)."""

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        address: str = LOCAL,
        autoreset_mode: str | AutoresetMode = AutoresetMode.SAME_STEP,
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        """``actor_options`` go to ``ray.remote(EnvWorker).options(...)`` (e.g. ``num_cpus``;
        Ray's default reserves no CPU for a running actor, so any number of envs fits)."""
        import ray  # lazy: Ray is an optional extra

        super().__init__()
        self._ray = ray
        self._owns_ray = False
        self._actors: list[Any] = []
        mode = AutoresetMode(autoreset_mode)
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(f"RayVectorEnv supports autoreset_mode=SAME_STEP only, got {mode}")
        if not env_fns:
            raise ValueError("RayVectorEnv needs at least one env")
        self.autoreset_mode = mode
        self.env_fns = env_fns
        self.address = address

        if not ray.is_initialized():
            if address == LOCAL:
                ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
            self._owns_ray = True

        try:
            worker = ray.remote(EnvWorker)
            if actor_options:
                worker = worker.options(**actor_options)
            self._actors = [worker.remote(fn) for fn in env_fns]
            specs = ray.get([a.spaces.remote() for a in self._actors])
            obs_space, act_space, metadata, render_mode = specs[0]
            for i, (o, a, _, _) in enumerate(specs):
                if o != obs_space or a != act_space:
                    raise RuntimeError(f"sub-env {i}'s spaces differ from sub-env 0's: {o}, {a}")
        except BaseException:
            self.close_extras()
            raise
        self.num_envs = len(self._actors)
        self.metadata = dict(metadata)
        self.metadata["autoreset_mode"] = self.autoreset_mode
        self.render_mode = render_mode
        self.single_observation_space = obs_space
        self.observation_space = batch_space(obs_space, self.num_envs)
        self.single_action_space = act_space
        self.action_space = batch_space(act_space, self.num_envs)

    def _batch_obs(self, env_obs: list[Any]) -> Any:
        out = create_empty_array(self.single_observation_space, n=self.num_envs, fn=np.zeros)
        return concatenate(self.single_observation_space, env_obs, out)

    def reset(
        self,
        *,
        seed: int | list[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Reset every sub-env; ``seed`` int seeds env i with ``seed + i`` (as gymnasium)."""
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} seeds, got {len(seeds)}")
        if options is not None and "reset_mask" in options:
            raise NotImplementedError("RayVectorEnv.reset does not support options['reset_mask']")
        results = self._ray.get(
            [a.reset.remote(seed=s, options=options) for a, s in zip(self._actors, seeds)]
        )
        infos: dict[str, Any] = {}
        for i, (_, info) in enumerate(results):
            infos = self._add_info(infos, info, i)
        return self._batch_obs([obs for obs, _ in results]), infos

    def step(self, actions: Any):
        refs = [
            a.step.remote(act)
            for a, act in zip(self._actors, iterate(self.action_space, actions), strict=True)
        ]
        results = self._ray.get(refs)
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminations = np.zeros(self.num_envs, dtype=np.bool_)
        truncations = np.zeros(self.num_envs, dtype=np.bool_)
        infos: dict[str, Any] = {}
        for i, (_, reward, term, trunc, info) in enumerate(results):
            rewards[i], terminations[i], truncations[i] = reward, term, trunc
            infos = self._add_info(infos, info, i)
        obs = self._batch_obs([r[0] for r in results])
        return obs, rewards, terminations, truncations, infos

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return tuple(self._ray.get([a.call.remote(name, *args, **kwargs) for a in self._actors]))

    def get_attr(self, name: str) -> tuple[Any, ...]:
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} values, got {len(values)}")
        self._ray.get([a.set_attr.remote(name, v) for a, v in zip(self._actors, values)])

    def close_extras(self, **kwargs: Any) -> None:
        """Close the envs, kill the actors; shut Ray down only if this object started it."""
        ray = getattr(self, "_ray", None)
        if ray is None:
            return
        actors, self._actors = getattr(self, "_actors", []), []
        if ray.is_initialized():
            try:
                ray.get([a.close.remote() for a in actors], timeout=10)
            except Exception:  # a dead actor or env must not keep the others alive
                pass
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:
                    pass
        if self._owns_ray:
            self._owns_ray = False
            ray.shutdown()
