package main

import (
	"context"
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
	testCommands(t, "etcd://"+srv.Endpoint()+"/cli-test?ttl=15s", srv.Stop, srv.Start, revoke)
}
