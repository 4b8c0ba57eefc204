/** Retry policy of resumed streams and retried idempotent calls. */

/**
 * How transient failures are retried: jittered exponential backoff, bounded.
 *
 * A resumed Subscribe gives up when `giveUpAfterMs` pass without progress (an event
 * received) or after `maxAttempts` consecutive failures (0: no count limit). Retried
 * unary calls use the same bounds, counted from the call's first attempt.
 */
export interface RetryPolicy {
  /** The first backoff ceiling in ms (default 100). */
  initialBackoffMs: number;
  /** The largest backoff ceiling in ms (default 2000). */
  maxBackoffMs: number;
  /** The ceiling's growth per attempt (default 2). */
  multiplier: number;
  /** Give up after this long without progress, in ms (default 30000). */
  giveUpAfterMs: number;
  /** Give up after this many consecutive failures; 0 means no count limit (default 0). */
  maxAttempts: number;
}

export const DEFAULT_RETRY_POLICY: Readonly<RetryPolicy> = Object.freeze({
  initialBackoffMs: 100,
  maxBackoffMs: 2000,
  multiplier: 2,
  giveUpAfterMs: 30_000,
  maxAttempts: 0,
});

/** The policy with defaults filled in. */
export function retryPolicy(overrides?: Partial<RetryPolicy>): RetryPolicy {
  return { ...DEFAULT_RETRY_POLICY, ...(overrides ?? {}) };
}

/**
 * The delay before retry number `attempt` (1-based): uniformly jittered between half
 * the ceiling and the ceiling, where the ceiling is initial * multiplier^(attempt-1),
 * capped at the maximum.
 */
export function backoffMs(policy: RetryPolicy, attempt: number, random: () => number = Math.random): number {
  const ceiling = Math.min(policy.maxBackoffMs, policy.initialBackoffMs * policy.multiplier ** Math.max(0, attempt - 1));
  return ceiling / 2 + random() * (ceiling / 2);
}

/** True when the policy says to stop retrying. */
export function shouldGiveUp(policy: RetryPolicy, attempt: number, idleMs: number): boolean {
  return idleMs > policy.giveUpAfterMs || (policy.maxAttempts > 0 && attempt > policy.maxAttempts);
}

/** Sleeps `ms`, rejecting with the signal's reason if it aborts first. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
