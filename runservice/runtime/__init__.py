"""The runtime: live runs, their logs, the agent API and the policies. No gRPC, no SQL."""
