package nacos_test

import (
	"errors"
	"testing"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/model"

	"github.com/rollcall-go/rollcall/backends/nacos"
	"github.com/rollcall-go/rollcall/registry"
)

// An ID registered by another client at another address is refused with
// registry.ErrConflict and the holder's registration stands; the same
// address (the same Nacos instance) is accepted; once the holders are gone
// the ID is free.
func TestDuplicateIDIsAConflict(t *testing.T) {
	srv := startServer(t)
	open := func() registry.Registry {
		return newRegistry(t, newClient(t, srv, nacos.ClientOptions{}), &nacos.Options{TTL: time.Minute})
	}
	a, b, c, watcher := open(), open(), open(), open()
	ids := watchIDs(t, watcher, "dup")
	regA, err := a.Register(ctxT(t), registry.Instance{Service: "dup", ID: "same", Addr: "10.0.0.1:7001"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the watcher to show the holder", func() bool { got, _ := ids(); return len(got) == 1 })
	_, err = b.Register(ctxT(t), registry.Instance{Service: "dup", ID: "same", Addr: "10.0.0.2:7002"})
	if !errors.Is(err, registry.ErrConflict) {
		t.Fatalf("Register of an ID another client holds at another address: %v, want registry.ErrConflict", err)
	}
	t.Logf("refused: %v", err)
	if got := srv.Instances("", "", "dup"); len(got) != 1 || got[0].Ip != "10.0.0.1" {
		t.Fatalf("the server holds %v, want the holder's 10.0.0.1:7001 only", got)
	}
	regC, err := c.Register(ctxT(t), registry.Instance{Service: "dup", ID: "same", Addr: "10.0.0.1:7001"})
	if err != nil {
		t.Fatalf("Register of the same ID at the same address: %v", err)
	}
	// Both hold one Nacos instance; either can leave.
	if err := regC.Deregister(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if err := regA.Deregister(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Register(ctxT(t), registry.Instance{Service: "dup", ID: "same", Addr: "10.0.0.2:7002"}); err != nil {
		t.Fatalf("Register after the holders left: %v", err)
	}
	// The watcher's client learns of it by the server's push.
	var list []registry.Instance
	var err2 error
	waitFor(t, 20*time.Second, "the watcher's Lookup to show the new holder", func() bool {
		list, err2 = watcher.Lookup(ctxT(t), "dup")
		return err2 == nil && len(list) == 1 && list[0].Addr == "10.0.0.2:7002"
	})
}

// A holder that has just left may still be in a client's list (the list
// trails the server by a push): the ID is refused only if the holder is
// still there after a push window. The removal's push is delayed by 1 s
// here, so the registering client's list shows the holder when it checks.
func TestJustDepartedHolderIsNoConflict(t *testing.T) {
	srv := startServer(t)
	r := newRegistry(t, newClient(t, srv, nacos.ClientOptions{}), &nacos.Options{TTL: time.Minute})
	ids := watchIDs(t, r, "dup")
	srv.Inject("", "", "dup", model.Instance{Ip: "10.0.0.9", Port: 7009, Weight: 1, Enable: true, Healthy: true, Ephemeral: true,
		Metadata: map[string]string{nacos.MetaID: "same"}})
	waitFor(t, 20*time.Second, "the client's list to show the foreign holder", func() bool { got, _ := ids(); return len(got) == 1 })
	srv.SetPushDelay(time.Second)
	if n := srv.RemoveInjected("", "", "dup", "10.0.0.9", 7009); n != 1 {
		t.Fatalf("RemoveInjected removed %d instances, want 1", n)
	}
	if got, _ := ids(); len(got) != 1 {
		t.Fatalf("the client's list shows %v before the removal was pushed, want the holder still", got)
	}
	if _, err := r.Register(ctxT(t), registry.Instance{Service: "dup", ID: "same", Addr: "10.0.0.2:7002"}); err != nil {
		t.Fatalf("Register of an ID whose holder has just left: %v", err)
	}
	if got := srv.Instances("", "", "dup"); len(got) != 1 || got[0].Ip != "10.0.0.2" {
		t.Fatalf("the server holds %v, want 10.0.0.2:7002 only", got)
	}
}
