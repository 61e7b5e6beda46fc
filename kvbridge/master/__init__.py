"""The kvbridge master: the cluster index (which node holds which block, in which tier),
node membership with heartbeats and load reports; an asyncio server and a sync client."""
