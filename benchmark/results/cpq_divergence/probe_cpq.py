"""Probes of CPQ on the bundled CarRun data: `python probe_cpq.py MODE [STEPS]`.
Modes adam / sgd / hinge_escape start from the paper's form (--ood-penalty linear --no-actor-escape) as the logs of
sections 1–3 did; data_ref starts from cpq.py's current defaults (hinge + escape step) and changes only what counts as
OOD: KL above the ood_quantile of the KL of the batch's *dataset* actions, instead of the top 25 % of the policy's
own samples (section 5)."""
import sys, os, torch, numpy as np
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, ROOT); import cpq
torch.manual_seed(0); np.random.seed(0)
mode = sys.argv[1]
total_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1500  # optional: steps; evaluates every 2,000
env = cpq.make_env("OfflineCarRun-v0", 0)
args = cpq.Args() if mode == "data_ref" else cpq.Args(ood_penalty="linear", actor_escape=False)
data = {k: torch.as_tensor(v) for k, v in cpq.load_dataset(os.path.join(ROOT, "datasets", "OfflineCarRun-v0.hdf5"), 7, 2).items()}
data["rewards"] *= 0.1
agent = cpq.CPQ(7, 2, args, cpq.episode_q_threshold(20, 0.99, 200))
if mode == "sgd":
    agent.alpha_opt = torch.optim.SGD([agent.log_alpha_c], lr=1e-4)
if mode == "hinge_escape":
    # candidate fix, NOT the spec: (1) push Qc(s, a_ood) up only until qc_thres (bounded penalty);
    # (2) where the gate is closed, the actor descends Qc instead of receiving no gradient.
    import types, torch.nn.functional as F
    def cost_critic_loss(self, obs, act, cost, next_obs, term, next_act):
        a = self.args
        with torch.no_grad():
            y_c = cost + a.gamma * (1 - term) * self.cost_critic_target(next_obs, next_act)[0]
            obs_rep = obs.repeat_interleave(a.num_ood_samples, 0)
            act_pi, _ = self.actor(obs_rep)
            kl = self.vae.kl(obs_rep, act_pi)
            ood = (kl >= torch.quantile(kl, a.ood_quantile)).float()
        qc = self.cost_critic(obs_rep, act_pi)[0]
        qc_ood = (qc * ood).sum() / ood.sum()
        hinge = (F.relu(self.qc_thres - qc) * ood).sum() / ood.sum()
        td = F.mse_loss(self.cost_critic(obs, act)[0], y_c)
        return td + self.log_alpha_c.exp().detach() * hinge, td, qc_ood.detach()
    agent.cost_critic_loss = types.MethodType(cost_critic_loss, agent)
    orig_update = agent.update
    def actor_step(self, obs):
        act_pi, _ = self.actor(obs)
        qc = self.cost_critic(obs, act_pi)[0]
        safe = (qc <= self.q_thres).float().detach()
        loss = -(safe * self.critic(obs, act_pi).min(0).values).mean() + ((1 - safe) * qc).mean()
        self.actor_opt.zero_grad(set_to_none=True); loss.backward(); self.actor_opt.step()
    agent.extra_actor_step = types.MethodType(actor_step, agent)
if mode == "data_ref":
    import types, torch.nn.functional as F
    def cost_critic_loss(self, obs, act, cost, next_obs, term, next_act):
        a = self.args
        with torch.no_grad():
            y_c = cost + a.gamma * (1 - term) * self.cost_critic_target(next_obs, next_act)[0]
            obs_rep = obs.repeat_interleave(a.num_ood_samples, 0)
            act_pi, _ = self.actor(obs_rep)
            threshold = torch.quantile(self.vae.kl(obs, act), a.ood_quantile)  # from the data's own actions
            ood = (self.vae.kl(obs_rep, act_pi) >= threshold).float()
            self.ood_fraction = ood.mean()
        qc = self.cost_critic(obs_rep, act_pi)[0]
        n = ood.sum().clamp_min(1.0)
        hinge = (F.relu(self.qc_thres - qc) * ood).sum() / n
        td = F.mse_loss(self.cost_critic(obs, act)[0], y_c)
        return td + self.log_alpha_c.exp().detach() * hinge, td, ((qc * ood).sum() / n).detach()
    agent.cost_critic_loss = types.MethodType(cost_critic_loss, agent)
g = torch.Generator().manual_seed(0)
for step in range(1, total_steps + 1):
    idx = torch.randint(len(data["rewards"]), (512,), generator=g)
    info = agent.update(data["observations"][idx], data["actions"][idx], data["rewards"][idx], data["costs"][idx],
                        data["next_observations"][idx], data["terminals"][idx])
    if mode == "hinge_escape":
        agent.extra_actor_step(data["observations"][idx])
    if step % 250 == 0:
        extra = {"ood_fraction": round(agent.ood_fraction.item(), 3)} if mode == "data_ref" else {}
        print(mode, step, {**{k.split('/')[1]: round(v.item(), 3) for k, v in info.items()}, **extra}, flush=True)
    if step % 2000 == 0:
        print(mode, step, "eval (10 deterministic episodes, d=20):", cpq.evaluate(agent.actor, env, 10, 20.0,
                                                                                 torch.device("cpu")), flush=True)
