package registry

import (
	"context"
	"fmt"
	"time"
)

// MetaServing is the metadata key SetServing writes: "false" marks an
// instance that is registered but takes no new calls. Lookup and Watch leave
// such instances out (a Watcher delivers the change as a removal, and the
// instance's return to serving as an addition), on every backend.
const MetaServing = "serving"

// DefaultDrainSettle is how long Drain waits, after the registry stopped
// listing the instance, for the removal to reach other processes' watchers
// and their load balancers, when it is given 0.
const DefaultDrainSettle = time.Second

// serving reports whether in takes calls (see MetaServing).
func serving(in Instance) bool { return in.Metadata[MetaServing] != "false" }

// Drain takes the instance out of discovery before its server stops, for a
// shutdown that drops no call: it deregisters the instance, waits until
// this Registry's Lookup no longer lists it, then waits settle more (the
// time other clients' watches and balancers take to act on the removal;
// DefaultDrainSettle when 0, none when negative). ctx bounds the whole
// wait. Then stop the server gracefully (grpc.Server.GracefulStop,
// http.Server.Shutdown): the calls still in flight finish, and clients have
// stopped sending new ones.
//
// Drain returns Deregister's error if the withdrawal does not succeed
// within ctx (it goes on in the background), and ctx's error if the
// registry still lists the instance when ctx ends.
func (g *Registration) Drain(ctx context.Context, settle time.Duration) error {
	if settle == 0 {
		settle = DefaultDrainSettle
	}
	inst := g.Instance()
	if err := g.Deregister(ctx); err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		list, err := g.r.Lookup(ctx, inst.Service)
		if err == nil && !listed(list, inst.ID) {
			break
		}
		if ctx.Err() != nil {
			if err == nil {
				err = fmt.Errorf("the registry still lists %s", inst.String())
			}
			return opErr("drain", inst.Service, fmt.Errorf("%w: %w", ctx.Err(), err))
		}
		// Backends whose reads trail their writes (a Nacos push) need a
		// moment; the first retries come fast.
		if !sleepCtx(ctx, min(time.Duration(attempt+1)*20*time.Millisecond, 200*time.Millisecond)) {
			continue // reports ctx's end above
		}
	}
	if settle > 0 && !sleepCtx(ctx, settle) {
		return opErr("drain", inst.Service, ctx.Err())
	}
	return nil
}

func listed(list []Instance, id string) bool {
	for _, in := range list {
		if in.ID == id {
			return true
		}
	}
	return false
}

// SetServing marks the instance as taking calls or not while it stays
// registered (go-zero's Pause and Resume): false takes it out of every
// client's Lookup and Watch, true brings it back. It is an Update of the
// MetaServing metadata key, with Update's bounds and errors. A server that
// also runs the gRPC health service should set its status to match
// (health.Server.SetServingStatus), for clients that check health.
func (g *Registration) SetServing(ctx context.Context, on bool) error {
	inst := g.Instance()
	if serving(inst) == on {
		return nil
	}
	if on {
		delete(inst.Metadata, MetaServing)
	} else {
		if inst.Metadata == nil {
			inst.Metadata = map[string]string{}
		}
		inst.Metadata[MetaServing] = "false"
	}
	return g.Update(ctx, inst)
}
