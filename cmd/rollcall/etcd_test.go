package main

import (
	"context"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/rollcall-go/rollcall/internal/testserver"
)

func TestEtcd(t *testing.T) {
	srv := testserver.StartEtcd(t)
	admin, err := clientv3.New(clientv3.Config{Endpoints: []string{srv.Endpoint()}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	revoke := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		ls, err := admin.Leases(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range ls.Leases {
			if _, err := admin.Revoke(ctx, l.ID); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The TTL outlives the outage, so that the registrations survive it.
	u := "etcd://" + srv.Endpoint() + "/cli-test?ttl=15s"
	testCommands(t, u, srv.Stop, srv.Start, revoke)
	// The prefix from the URL path is shown, and scopes ls: the root lists
	// the prefix's services as none of its own.
	code, out, errout := exec(t, "ls", u)
	if code != exitOK || out != "" || !strings.Contains(errout, `rollcall ls: registry prefix "cli-test" (from the URL path`) {
		t.Fatalf("ls %s: exit %d\nstdout:\n%s\nstderr:\n%s", u, code, out, errout)
	}
	reg := startCmd(t, "register", "etcd://"+srv.Endpoint()+"/greeter", "user.rpc", "127.0.0.1:7009")
	reg.waitOut(t, "registered user.rpc/127.0.0.1:7009", 10*time.Second)
	if !strings.Contains(reg.errout.String(), `rollcall register: registry prefix "greeter"`) {
		t.Fatalf("register did not show its prefix:\n%s", reg.errout.String())
	}
	code, out, errout = exec(t, "ls", "etcd://"+srv.Endpoint()+"/greeter", "--json")
	if code != exitOK || strings.Join(strings.Fields(out), "") != `[{"service":"user.rpc","instances":1}]` {
		t.Fatalf("ls of the prefix greeter: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errout)
	}
	code, out, errout = exec(t, "ls", "etcd://"+srv.Endpoint())
	if code != exitOK || out != "" || !strings.Contains(errout, "no services in") || strings.Contains(errout, "prefix") {
		t.Fatalf("ls of the root: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errout)
	}
	if code := reg.interrupt(t); code != exitOK {
		t.Fatalf("register after Ctrl-C: exit %d", code)
	}
}
