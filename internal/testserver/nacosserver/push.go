package nacosserver

import (
	"encoding/json"
	"strconv"
	"time"

	pb "github.com/nacos-group/nacos-sdk-go/v2/api/grpc"
	"github.com/nacos-group/nacos-sdk-go/v2/common/remote/rpc/rpc_request"
	"google.golang.org/protobuf/types/known/anypb"
)

// pushTask is a PushDelayTask: push a service to all its subscribers or to
// some of them, not before due. Tasks for one service merge
// (PushDelayTask#merge keeps the earliest time and unites the targets).
type pushTask struct {
	due     time.Time
	all     bool
	targets map[string]struct{}
}

// changedLocked is a ServiceChangedEvent: push the service to every
// subscriber after the push delay.
func (s *Server) changedLocked(k svcKey) { s.addPushTaskLocked(k, s.pushDelay, "") }

// addPushTaskLocked schedules a push of k in delay, to every subscriber when
// target is "", else to that connection.
func (s *Server) addPushTaskLocked(k svcKey, delay time.Duration, target string) {
	due := time.Now().Add(delay)
	t := s.pushTasks[k]
	if t == nil {
		t = &pushTask{due: due, targets: make(map[string]struct{})}
		s.pushTasks[k] = t
	} else if due.Before(t.due) {
		t.due = due
	}
	if target == "" {
		t.all = true
	} else {
		t.targets[target] = struct{}{}
	}
	if s.run != nil {
		select {
		case s.run.pushWake <- struct{}{}:
		default:
		}
	}
}

// pushLoop runs the push tasks that are due and retries pushes that were not
// acknowledged in time (PushDelayTaskExecuteEngine + PushExecuteTask).
func (s *Server) pushLoop(r *runState) {
	defer r.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if s.gate(r.ctx, r) != nil {
			return
		}
		timer.Reset(s.runPushes(r, time.Now()))
		select {
		case <-r.ctx.Done():
			return
		case <-r.pushWake:
		case <-timer.C:
		}
	}
}

// runPushes executes what is due at now and returns how long to wait for the
// next thing to do.
func (s *Server) runPushes(r *runState, now time.Time) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.run != r {
		return time.Hour
	}
	for _, c := range s.conns {
		for id, a := range c.acks {
			if a.push == nil || now.Before(a.deadline) {
				continue
			}
			delete(c.acks, id)
			s.logf("push %s of %s to %s not acknowledged, retrying", id, a.push.grouped(), c.id)
			if _, ok := c.subscribed[*a.push]; ok {
				s.addPushTaskLocked(*a.push, pushRetryDelay, c.id)
			}
		}
	}
	for k, t := range s.pushTasks {
		if !t.due.After(now) {
			delete(s.pushTasks, k)
			s.executePushLocked(k, t, now)
		}
	}
	next := time.Hour
	for _, t := range s.pushTasks {
		next = min(next, t.due.Sub(now))
	}
	for _, c := range s.conns {
		for _, a := range c.acks {
			if a.push != nil {
				next = min(next, a.deadline.Sub(now))
			}
		}
	}
	return max(next, time.Millisecond)
}

// executePushLocked is PushExecuteTask#run with PushExecutorRpcImpl: the data
// is computed once (refreshing the cache getData serves) and every target
// gets it without disabled instances (selectInstancesWithHealthyProtection
// with healthyOnly=false, enableOnly=true).
func (s *Server) executePushLocked(k svcKey, t *pushTask, now time.Time) {
	targets := t.targets
	if t.all {
		targets = s.subscribers[k]
	}
	if len(targets) == 0 {
		s.getPushDataLocked(k)
		return
	}
	info := selectInstances(s.getPushDataLocked(k), "", false, true)
	for id := range targets {
		c := s.conns[id]
		if c == nil {
			continue // "means this client has disconnect"
		}
		if _, ok := c.subscribed[k]; !ok {
			continue
		}
		reqID := s.nextRequestIDLocked()
		// NotifySubscriberRequest.buildNotifySubscriberRequest sets only the
		// ServiceInfo; module is "naming".
		req := &rpc_request.NotifySubscriberRequest{
			NamingRequest: &rpc_request.NamingRequest{Request: &rpc_request.Request{RequestId: reqID}, Module: "naming"},
			ServiceInfo:   info,
		}
		p, err := requestPayload(req.GetRequestType(), req)
		if err != nil {
			s.logf("encode push: %v", err)
			continue
		}
		c.acks[reqID] = &pendingAck{push: &k, deadline: now.Add(s.ackWait)}
		c.out.push(p)
		s.logf("push %s %s (%d hosts, lastRefTime %d) to %s", reqID, k.grouped(), len(info.Hosts), info.LastRefTime, c.id)
	}
}

func (s *Server) nextRequestIDLocked() string {
	s.reqSeq++
	return strconv.FormatUint(s.reqSeq, 10)
}

// requestPayload wraps a server request as GrpcUtils.convert(Request) does:
// the headers go to the metadata, the body is the JSON of the request.
func requestPayload(typ string, req rpc_request.IRequest) (*pb.Payload, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	return &pb.Payload{
		Metadata: &pb.Metadata{Type: typ, ClientIp: "127.0.0.1", Headers: req.GetHeaders()},
		Body:     &anypb.Any{Value: body},
	}, nil
}

// ack handles a response the client sent on the stream
// (RpcAckCallbackSynchronizer#ackNotify).
func (s *Server) ack(c *client, p *pb.Payload) {
	var resp struct {
		RequestID  string `json:"requestId"`
		ResultCode int    `json:"resultCode"`
	}
	if err := json.Unmarshal(p.GetBody().GetValue(), &resp); err != nil {
		s.logf("bad ack from %s: %v", c.id, err)
		return
	}
	// Java's Response#isSuccess is resultCode == 200; a "success" field in the
	// JSON is ignored. The SDK relies on that: its ClientDetectionResponse and
	// ConnectResetResponse say "success":false with resultCode 200.
	ok := resp.ResultCode == 200
	s.mu.Lock()
	a := c.acks[resp.RequestID]
	delete(c.acks, resp.RequestID)
	if a != nil && a.push != nil && !ok {
		if _, sub := c.subscribed[*a.push]; sub {
			s.addPushTaskLocked(*a.push, pushRetryDelay, c.id)
		}
	}
	s.mu.Unlock()
	if a != nil && a.ch != nil {
		a.ch <- ok
	}
}

// sendLoop writes the connection's outbox to its stream.
func (s *Server) sendLoop(r *runState, c *client, stream pb.BiRequestStream_RequestBiStreamServer) {
	defer close(c.senderDone)
	ctx := stream.Context()
	for {
		select {
		case <-c.done:
			return
		case <-ctx.Done():
			return
		case <-c.out.notify:
		}
		for p := c.out.pop(); p != nil; p = c.out.pop() {
			if s.gate(ctx, r) != nil {
				return
			}
			select {
			case <-c.done:
				return
			default:
			}
			if err := stream.Send(p); err != nil {
				return
			}
		}
	}
}

type sentRequest struct {
	c  *client
	ch chan bool
}

// sendToAll sends a server request built by mk to every registered
// connection and returns what it sent, for waitAnswers.
func (s *Server) sendToAll(mk func(reqID string) rpc_request.IRequest) []sentRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	var sent []sentRequest
	for _, c := range s.conns {
		reqID := s.nextRequestIDLocked()
		req := mk(reqID)
		p, err := requestPayload(req.GetRequestType(), req)
		if err != nil {
			continue
		}
		ch := make(chan bool, 1)
		c.acks[reqID] = &pendingAck{ch: ch}
		c.out.push(p)
		sent = append(sent, sentRequest{c: c, ch: ch})
	}
	return sent
}

// waitAnswers waits until timeout for the answers to sent and splits the
// connections into those that answered successfully and the others.
func waitAnswers(sent []sentRequest, timeout time.Duration) (ok, failed []*client) {
	deadline := time.Now().Add(timeout)
	for _, sr := range sent {
		good := false
		select {
		case good = <-sr.ch:
		default:
			t := time.NewTimer(max(time.Until(deadline), 0))
			select {
			case good = <-sr.ch:
			case <-sr.c.done:
			case <-t.C:
			}
			t.Stop()
		}
		if good {
			ok = append(ok, sr.c)
		} else {
			failed = append(failed, sr.c)
		}
	}
	return ok, failed
}

// DetectClients sends ClientDetectionRequest to every connection, as Nacos'
// connection ejector (NacosRuntimeConnectionEjector) does for idle ones, and
// unregisters and closes those that do not answer within timeout. It returns
// the number of connections that answered. Do not call it while paused.
func (s *Server) DetectClients(timeout time.Duration) int {
	sent := s.sendToAll(func(reqID string) rpc_request.IRequest {
		return &rpc_request.ClientDetectionRequest{InternalRequest: internalRequest(reqID)}
	})
	ok, failed := waitAnswers(sent, timeout)
	s.mu.Lock()
	r := s.run
	for _, c := range failed {
		s.unregisterLocked(c)
	}
	s.mu.Unlock()
	if r != nil {
		for _, c := range failed {
			r.glis.closeConns(func(remote string) bool { return remote == c.remote })
		}
	}
	return len(ok)
}

// SendConnectReset sends ConnectResetRequest to every connection, as
// ConnectionManager#loadSingle does when it sheds load, and returns how many
// acknowledged within 3 s. With serverIP (and serverPort) naming a server in
// the SDK's server list, e.g. Host() and strconv.FormatUint(Port(), 10), the
// SDK opens a new connection and drops the old one; with empty strings it
// only health-checks its current connection and keeps it
// (ConnectResetRequestHandler -> switchServerAsync(ServerInfo{}, true)).
func (s *Server) SendConnectReset(serverIP, serverPort string) int {
	sent := s.sendToAll(func(reqID string) rpc_request.IRequest {
		return &rpc_request.ConnectResetRequest{InternalRequest: internalRequest(reqID), ServerIp: serverIP, ServerPort: serverPort}
	})
	ok, _ := waitAnswers(sent, serverRequestTimeout)
	return len(ok)
}

func internalRequest(reqID string) *rpc_request.InternalRequest {
	ir := rpc_request.NewInternalRequest()
	ir.RequestId = reqID
	return ir
}
