package testserver

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/rollcall-go/rollcall/internal/testutil"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestVersionsMatchWrappers keeps the Versions table in step with the wrapper
// modules that scripts/build-servers.sh builds (and names the cache after).
func TestVersionsMatchWrappers(t *testing.T) {
	modules := map[string]string{
		"etcd":           "go.etcd.io/etcd/server/v3",
		"consul":         "github.com/hashicorp/consul",
		"kube-apiserver": "k8s.io/kubernetes",
	}
	if len(modules) != len(Versions) {
		t.Fatalf("Versions has %d servers, this test knows %d", len(Versions), len(modules))
	}
	for name, mod := range modules {
		gomod := filepath.Join("..", "..", "tools", "servers", name, "go.mod")
		got, err := requiredVersion(gomod, mod)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if want := Versions[name]; got != want {
			t.Errorf("%s requires %s %s; Versions[%q] = %s", gomod, mod, got, name, want)
		}
	}
}

// requiredVersion finds "require mod v" or a "mod v" line in a require block.
func requiredVersion(gomod, mod string) (string, error) {
	f, err := os.Open(gomod)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && fields[0] == "require" && fields[1] == mod {
			return fields[2], nil
		}
		if len(fields) >= 2 && fields[0] == mod && strings.HasPrefix(fields[1], "v") {
			return fields[1], nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", os.ErrNotExist
}

func TestBinaryCacheRule(t *testing.T) {
	t.Setenv("ROLLCALL_SERVER_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "/xdg")
	if got, _ := CacheDir(); got != "/xdg/rollcall/servers" {
		t.Errorf("CacheDir with XDG_CACHE_HOME = %q", got)
	}
	t.Setenv("XDG_CACHE_HOME", "")
	t.Setenv("HOME", "/home/u")
	if got, _ := CacheDir(); got != "/home/u/.cache/rollcall/servers" {
		t.Errorf("CacheDir with HOME = %q", got)
	}

	cache := t.TempDir()
	t.Setenv("ROLLCALL_SERVER_CACHE", cache)
	_, err := Binary("etcd")
	if err == nil || !strings.Contains(err.Error(), "scripts/build-servers.sh etcd") {
		t.Errorf("Binary(etcd) in an empty cache: error %v, want one naming scripts/build-servers.sh etcd", err)
	}
	if _, err := Binary("zookeeper"); err == nil {
		t.Error("Binary(zookeeper): no error")
	}
	if _, err := KubebuilderAssets(); err == nil {
		t.Error("KubebuilderAssets in an empty cache: no error")
	}

	// With both binaries in place, KubebuilderAssets links them.
	for _, name := range []string{"etcd", "kube-apiserver"} {
		dir := filepath.Join(cache, name+"-"+Versions[name])
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		want := filepath.Join(dir, name)
		if got, err := Binary(name); err != nil || got != want {
			t.Errorf("Binary(%s) = %q, %v; want %q", name, got, err, want)
		}
	}
	assets, err := KubebuilderAssets()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"etcd", "kube-apiserver"} {
		if fi, err := os.Stat(filepath.Join(assets, name)); err != nil || !fi.Mode().IsRegular() {
			t.Errorf("%s/%s: %v", assets, name, err)
		}
	}
}

func newEtcdClient(t *testing.T, e *Etcd) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{e.Endpoint()},
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func mustPut(t *testing.T, cli *clientv3.Client, key, value string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, key, value); err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
}

// mustGet returns the value of key, or "" if there is none.
func mustGet(t *testing.T, cli *clientv3.Client, key string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, key)
	if err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	if len(resp.Kvs) == 0 {
		return ""
	}
	return string(resp.Kvs[0].Value)
}

func TestEtcd(t *testing.T) {
	start := time.Now()
	e := StartEtcd(t)
	t.Logf("etcd ready at %s in %v", e.Endpoint(), time.Since(start).Round(time.Millisecond))
	if !strings.HasPrefix(e.Endpoint(), "127.0.0.1:") {
		t.Errorf("Endpoint() = %q, want 127.0.0.1:port", e.Endpoint())
	}
	cli := newEtcdClient(t, e)

	mustPut(t, cli, "/k", "v1")
	if got := mustGet(t, cli, "/k"); got != "v1" {
		t.Fatalf("get /k = %q, want v1", got)
	}

	t.Run("pause", func(t *testing.T) {
		e.Pause()
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		_, err := cli.Get(ctx, "/k")
		cancel()
		if err == nil {
			t.Error("get from a paused etcd succeeded")
		}
		e.Resume()
		if got := mustGet(t, cli, "/k"); got != "v1" {
			t.Errorf("get /k after resume = %q, want v1", got)
		}
	})

	t.Run("stop start keeps data", func(t *testing.T) {
		e.Stop()
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		_, err := cli.Get(ctx, "/k")
		cancel()
		if err == nil {
			t.Error("get from a stopped etcd succeeded")
		}
		e.Start()
		if got := mustGet(t, cli, "/k"); got != "v1" {
			t.Errorf("get /k after restart = %q, want v1", got)
		}
		mustPut(t, cli, "/k", "v2")
		e.Restart(false)
		if got := mustGet(t, cli, "/k"); got != "v2" {
			t.Errorf("get /k after Restart(false) = %q, want v2", got)
		}
	})

	t.Run("wipe loses data", func(t *testing.T) {
		e.Stop()
		e.Wipe()
		e.Start()
		if got := mustGet(t, cli, "/k"); got != "" {
			t.Errorf("get /k after wipe = %q, want nothing", got)
		}
		mustPut(t, cli, "/k", "v3")
		e.Restart(true)
		if got := mustGet(t, cli, "/k"); got != "" {
			t.Errorf("get /k after Restart(true) = %q, want nothing", got)
		}
	})
}

// TestEtcdCluster: a 3-member cluster serves on every member; freezing its
// leader makes the other two elect another, and the frozen member rejoins
// once resumed.
func TestEtcdCluster(t *testing.T) {
	c := StartEtcdCluster(t, 3)
	if len(c.Endpoints()) != 3 {
		t.Fatalf("endpoints %v", c.Endpoints())
	}
	leader, err := c.Leader()
	if err != nil {
		t.Fatal(err)
	}
	c.Members[leader].Pause()
	var next int
	testutil.WaitFor(t, 30*time.Second, "a new leader among the members not frozen", func() bool {
		l, err := c.Leader()
		next = l
		return err == nil && l != leader
	})
	c.Members[leader].Resume()
	c.WaitHealthy()
	if l, err := c.Leader(); err != nil || l < 0 {
		t.Fatalf("after the resume: leader %d, %v", l, err)
	}
	t.Logf("leader %d frozen, %d elected", leader, next)
}
