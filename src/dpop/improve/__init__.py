"""Making the model better with its own answers: `dpop iterate` (Iterative RPO's loop with any loss) and the
Bradley–Terry reward model (`dpop rm`) that can judge its samples where no verifier exists."""
