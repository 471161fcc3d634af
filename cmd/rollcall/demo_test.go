package main

import (
	"context"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/internal/testutil"
)

// TestDemo runs the demo on a shorter schedule and checks that it told the
// whole story, and that no call failed while etcd was down.
func TestDemo(t *testing.T) {
	s := demoSchedule{
		TTL:    6 * time.Second, // renewals every 2s: survives the 2.5s outage
		Call:   20 * time.Millisecond,
		Report: time.Second,
		Warmup: time.Second,
		Outage: 2500 * time.Millisecond, // more than the narrator's 1.5s to notice
		After:  time.Second,
		Wait:   10 * time.Second,
	}
	var out testutil.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	if err := runDemo(ctx, &out, s); err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	text := out.String()
	t.Logf("demo took %v:\n%s", time.Since(start).Round(time.Millisecond), text)
	for _, want := range []string{
		"etcd: + server-1", "etcd: + server-2", "etcd: + server-3",
		"== server-2 crashes",
		"etcd: - server-2: its registration is gone",
		"== the registry goes away: etcd is stopped ==",
		"etcd unreachable: watchers and the gRPC client keep their last list (2 servers)",
		"== etcd starts again, on the same ports and data directory ==",
		"etcd reachable again: the watch resynced, 2 servers listed",
		"etcd: + server-4",
		"server-4 got its first call",
		"What happened:",
		"etcd dropped server-2",
		"4. etcd came back with its data; the watches resynced",
		"5. server-4 registered and got its first call",
		"== server-4's weight becomes 3; a second client balances by weight ==",
		"6. server-4's weight became 3 in etcd",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("the demo did not say %q", want)
		}
	}
	// Calls were spread over the three servers before the crash.
	if m := regexp.MustCompile(`them: server-1:(\d+)  server-2:(\d+)  server-3:(\d+)\.`).FindStringSubmatch(text); m == nil {
		t.Error("no spread of calls over server-1..3 before the crash")
	}
	// Every call made while etcd was down succeeded.
	m := regexp.MustCompile(`(\d+) calls made meanwhile, (\d+) succeeded, (\d+) failed`).FindStringSubmatch(text)
	if m == nil {
		t.Fatal("no account of the calls during the outage")
	}
	if n, _ := strconv.Atoi(m[1]); n == 0 || m[3] != "0" {
		t.Errorf("during the outage: %s calls, %s failed; want some, none failed", m[1], m[3])
	}
	// The weighted client sent server-4 (weight 3) 3 of every 5 calls.
	if m := regexp.MustCompile(`second client, 500 calls in a row: server-1:(\d+)  server-3:(\d+)  server-4:(\d+) \(0 failed\)`).FindStringSubmatch(text); m == nil {
		t.Error("no account of the weighted client's calls over server-1, 3 and 4")
	} else if n, _ := strconv.Atoi(m[3]); n < 270 || n > 330 {
		t.Errorf("the weighted client sent server-4 (weight 3 of 5) %d of 500 calls: %v", n, m[0])
	}
	// And the last report shows server-4 serving next to the survivors.
	reports := regexp.MustCompile(`calls: .*`).FindAllString(text, -1)
	if len(reports) == 0 || !strings.Contains(reports[len(reports)-1], "server-4:") || strings.Contains(reports[len(reports)-1], "server-2:") {
		t.Errorf("last report %q: want server-4 and not server-2", reports[len(reports)-1:])
	}
}
